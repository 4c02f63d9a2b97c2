//! [`Api`]: the authenticated HTTP endpoints (devices, sending, sync, presence, privacy).
//!
//! Every method is one request. Errors come back as [`Error::Server`] with the server's
//! [`ErrorBody`](parley_spec::ErrorBody); nothing is retried automatically here.

use crate::{
    client::{method_of, url_of},
    error::{parse_retry_after, server_error, Error},
    Session,
};
use parley_spec::{
    endpoint::Endpoint,
    v1::{
        account::{Logout, WhoAmI, WhoAmIResponse},
        devices::{DeleteDevice, DeleteDeviceRequest, DevicesResponse, ListDevices, UserDevices, UserDevicesResponse},
        groups::{
            CreateGroup, CreateGroupRequest, CreateGroupResponse, GroupEvents, GroupEventsQuery, GroupEventsResponse,
            GroupListResponse, GroupSend, GroupSendRequest, GroupSentResponse, ListGroups,
        },
        keypackages::{
            ClaimKeyPackages, ClaimKeyPackagesRequest, ClaimKeyPackagesResponse, UploadKeyPackages, UploadKeyPackagesRequest,
            UploadKeyPackagesResponse,
        },
        keys::{
            ClaimKeys, ClaimRequest, ClaimResponse, GetDeviceList, PutDeviceList, SignedDeviceList, UploadKeys,
            UploadKeysRequest, UploadKeysResponse,
        },
        media::{
            CompleteUpload, CompleteUploadRequest, CreateUpload, CreateUploadRequest, DownloadMedia, GetMediaConfig, GetUpload,
            MediaConfig, MediaInfo, UploadState,
        },
        messages::{MarkRead, ReadRequest, SendMessage, SendRequest, SentResponse},
        presence::{
            GetPresence, ListSubscriptions, PresenceInfo, PrivacySettings, SetPrivacy, SubscribePresence, SubscribeRequest,
            SubscriptionsResponse, Visibility,
        },
        sync::{SyncEvents, SyncResponse},
    },
    DeviceId, GroupId, GroupSeq, Seq, UserId,
};
use reqwest::{
    header::{HeaderValue, AUTHORIZATION, RETRY_AFTER},
    RequestBuilder, Response,
};
use serde::de::DeserializeOwned;
use std::{fmt, time::Duration};
use url::Url;

/// Timeout for establishing a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout for a whole ordinary request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout for one upload part.
const PART_TIMEOUT: Duration = Duration::from_secs(600);

/// Authenticated HTTP access for one device.
///
/// Cheap to clone. [`Client::api`](crate::Client::api) builds one that shares the client's
/// connection pool.
#[derive(Clone)]
pub struct Api {
    session: Session,
    base: Url,
    auth: HeaderValue,
    http: reqwest::Client,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api").field("session", &self.session).finish_non_exhaustive()
    }
}

impl Api {
    /// An API handle for `session`, with its own connection pool.
    pub fn new(session: &Session) -> Result<Self, Error> {
        Self::with_http_client(session, new_http_client()?)
    }

    /// An API handle for `session` using an existing `reqwest` client.
    pub fn with_http_client(session: &Session, http: reqwest::Client) -> Result<Self, Error> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", session.access_token())).map_err(|_| Error::InvalidToken)?;
        auth.set_sensitive(true);
        Ok(Self { session: session.clone(), base: session.base()?, auth, http })
    }

    /// The session this handle authenticates as.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// `GET /v1/whoami`.
    pub async fn whoami(&self) -> Result<WhoAmIResponse, Error> {
        decode(self.request::<WhoAmI>(&[])?.send().await?).await
    }

    /// `GET /v1/devices`: the caller's devices, oldest first.
    pub async fn devices(&self) -> Result<DevicesResponse, Error> {
        decode(self.request::<ListDevices>(&[])?.send().await?).await
    }

    /// `DELETE /v1/devices/{device_id}`: removes one of the caller's devices (needs the password).
    pub async fn delete_device(&self, device_id: &DeviceId, password: &str) -> Result<(), Error> {
        let req = self.request::<DeleteDevice>(&[device_id.as_str()])?;
        no_content(req.json(&DeleteDeviceRequest::new(password)).send().await?).await
    }

    /// `GET /v1/users/{user_id}/devices`: the device ids a sender must encrypt to.
    pub async fn user_devices(&self, user_id: &UserId) -> Result<UserDevicesResponse, Error> {
        let req = self.request::<UserDevices>(&[user_id.as_str()])?;
        decode(req.send().await?).await
    }

    /// `POST /v1/logout`: removes this device; the session stops working.
    pub async fn logout(&self) -> Result<(), Error> {
        no_content(self.request::<Logout>(&[])?.send().await?).await
    }

    /// `POST /v1/send`: sends a message over HTTP (the twin of [`Connection::send_request`](crate::Connection::send_request)).
    pub async fn send(&self, req: SendRequest) -> Result<SentResponse, Error> {
        decode(self.request::<SendMessage>(&[])?.json(&req).send().await?).await
    }

    /// `POST /v1/read`: marks messages from `req.peer` as read.
    pub async fn read(&self, req: ReadRequest) -> Result<(), Error> {
        no_content(self.request::<MarkRead>(&[])?.json(&req).send().await?).await
    }

    /// `GET /v1/sync`: events after `since` (which acknowledges everything up to it), waiting up
    /// to `timeout_ms` for one when there is none.
    pub async fn sync(&self, since: Seq, timeout_ms: u64, limit: Option<u32>) -> Result<SyncResponse, Error> {
        let mut query = vec![("since", since.to_string()), ("timeout_ms", timeout_ms.to_string())];
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        let req = self.request::<SyncEvents>(&[])?.query(&query).timeout(REQUEST_TIMEOUT + Duration::from_millis(timeout_ms));
        decode(req.send().await?).await
    }

    /// `GET /v1/presence/{user_id}`.
    pub async fn presence(&self, user_id: &UserId) -> Result<PresenceInfo, Error> {
        decode(self.request::<GetPresence>(&[user_id.as_str()])?.send().await?).await
    }

    /// `PUT /v1/presence/subscriptions`: adds `users` to the caller's contacts.
    pub async fn subscribe_presence(&self, users: Vec<UserId>) -> Result<SubscriptionsResponse, Error> {
        let req = self.request::<SubscribePresence>(&[])?;
        decode(req.json(&SubscribeRequest::new(users)).send().await?).await
    }

    /// `GET /v1/presence/subscriptions`: the caller's contacts with their presence.
    pub async fn subscriptions(&self) -> Result<SubscriptionsResponse, Error> {
        decode(self.request::<ListSubscriptions>(&[])?.send().await?).await
    }

    /// `PUT /v1/account/privacy`: who may see this user's online state and last-seen time.
    pub async fn set_privacy(&self, last_seen: Visibility) -> Result<(), Error> {
        let req = self.request::<SetPrivacy>(&[])?;
        no_content(req.json(&PrivacySettings::new(last_seen)).send().await?).await
    }

    /// `POST /v1/keys/upload`: device keys and prekeys; answers the one-time prekey count.
    pub async fn upload_keys(&self, req: &UploadKeysRequest) -> Result<UploadKeysResponse, Error> {
        decode(self.request::<UploadKeys>(&[])?.json(req).send().await?).await
    }

    /// `PUT /v1/keys/device-list`: publishes the user's signed device list.
    pub async fn put_device_list(&self, list: &SignedDeviceList) -> Result<(), Error> {
        no_content(self.request::<PutDeviceList>(&[])?.json(list).send().await?).await
    }

    /// `GET /v1/users/{user_id}/device-list`: a user's signed device list (verify it!).
    pub async fn device_list(&self, user_id: &UserId) -> Result<SignedDeviceList, Error> {
        decode(self.request::<GetDeviceList>(&[user_id.as_str()])?.send().await?).await
    }

    /// `POST /v1/keys/claim`: one prekey bundle per device (verify them!).
    pub async fn claim_keys(&self, req: &ClaimRequest) -> Result<ClaimResponse, Error> {
        decode(self.request::<ClaimKeys>(&[])?.json(req).send().await?).await
    }

    /// `POST /v1/keypackages`: one-time and last-resort MLS KeyPackages of this device; answers
    /// the one-time KeyPackage count.
    pub async fn upload_keypackages(&self, req: &UploadKeyPackagesRequest) -> Result<UploadKeyPackagesResponse, Error> {
        decode(self.request::<UploadKeyPackages>(&[])?.json(req).send().await?).await
    }

    /// `POST /v1/keypackages/claim`: one KeyPackage per device (check each against its owner's
    /// signed device list!).
    pub async fn claim_keypackages(&self, req: &ClaimKeyPackagesRequest) -> Result<ClaimKeyPackagesResponse, Error> {
        decode(self.request::<ClaimKeyPackages>(&[])?.json(req).send().await?).await
    }

    /// `POST /v1/groups`: registers a group (hubbed on this server) from its creator's epoch-0
    /// GroupInfo and ratchet tree.
    pub async fn create_group(&self, req: &CreateGroupRequest) -> Result<CreateGroupResponse, Error> {
        decode(self.request::<CreateGroup>(&[])?.json(req).send().await?).await
    }

    /// `POST /v1/groups/{group_id}/send`: one MLS message (application message, or a commit
    /// with its GroupInfo and Welcome), answered once the hub stored it. The same
    /// `client_msg_id` again gets the same answer.
    pub async fn group_send(&self, group_id: &GroupId, req: &GroupSendRequest) -> Result<GroupSentResponse, Error> {
        decode(self.request::<GroupSend>(&[group_id.as_str()])?.json(req).send().await?).await
    }

    /// `GET /v1/groups/{group_id}/events?after=N`: the device's group stream after a position.
    pub async fn group_events(&self, group_id: &GroupId, after: GroupSeq) -> Result<GroupEventsResponse, Error> {
        let query = GroupEventsQuery::after(after);
        decode(self.request::<GroupEvents>(&[group_id.as_str()])?.query(&query).send().await?).await
    }

    /// `GET /v1/groups`: the device's groups with its cursor and the latest position.
    pub async fn groups(&self) -> Result<GroupListResponse, Error> {
        decode(self.request::<ListGroups>(&[])?.send().await?).await
    }

    /// `GET /v1/media/config`: the server's media limits and this user's quota use.
    pub async fn media_config(&self) -> Result<MediaConfig, Error> {
        decode(self.request::<GetMediaConfig>(&[])?.send().await?).await
    }

    /// `POST /v1/media/uploads`: starts an upload (or finds the file stored already).
    pub async fn create_upload(&self, req: &CreateUploadRequest) -> Result<UploadState, Error> {
        decode(self.request::<CreateUpload>(&[])?.json(req).send().await?).await
    }

    /// `GET /v1/media/uploads/{upload_id}`: what the server holds, and fresh part URLs.
    pub async fn upload_state(&self, upload_id: &str) -> Result<UploadState, Error> {
        decode(self.request::<GetUpload>(&[upload_id])?.send().await?).await
    }

    /// `POST /v1/media/uploads/{upload_id}/complete`.
    pub async fn complete_upload(&self, upload_id: &str, req: &CompleteUploadRequest) -> Result<MediaInfo, Error> {
        decode(self.request::<CompleteUpload>(&[upload_id])?.json(req).send().await?).await
    }

    /// `PUT`s one part to its URL (the server's, relative to the base URL, or a presigned
    /// store's); the `ETag` the store answered, if any. No access token goes with it: the URL
    /// authorizes the request.
    pub async fn put_part(&self, url: &str, bytes: Vec<u8>) -> Result<Option<String>, Error> {
        let url = self.base.join(url).map_err(|e| Error::InvalidUrl(e.to_string()))?;
        let resp = self
            .http
            .put(url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(bytes)
            .timeout(PART_TIMEOUT)
            .send()
            .await?;
        let resp = check(resp).await?;
        Ok(resp.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned))
    }

    /// `GET /v1/media/{server}/{media_id}` from byte `from` on: the response, to be read chunk
    /// by chunk (206 when `from` > 0 and the server honoured it).
    pub async fn download(&self, server: &str, media_id: &str, from: u64) -> Result<Response, Error> {
        let mut request = self.request::<DownloadMedia>(&[server, media_id])?.timeout(Duration::from_secs(24 * 3600));
        if from > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        check(request.send().await?).await
    }

    /// A request to endpoint `E` with its path parameters `params`, authenticated.
    fn request<E: Endpoint>(&self, params: &[&str]) -> Result<RequestBuilder, Error> {
        let url = url_of::<E>(&self.base, params)?;
        let method = method_of::<E>();
        tracing::debug!(%method, path = url.path(), "request");
        Ok(self.http.request(method, url).header(AUTHORIZATION, self.auth.clone()).timeout(REQUEST_TIMEOUT))
    }
}

/// The HTTP client the SDK uses: connect timeout, no global request timeout (long polls set
/// their own), rustls.
pub(crate) fn new_http_client() -> Result<reqwest::Client, Error> {
    Ok(reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).build()?)
}

/// Decodes a 2xx JSON answer, or turns a non-2xx answer into [`Error::Server`].
pub(crate) async fn decode<T: DeserializeOwned>(resp: Response) -> Result<T, Error> {
    let resp = check(resp).await?;
    let bytes = resp.bytes().await?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Accepts any 2xx answer and ignores its body.
async fn no_content(resp: Response) -> Result<(), Error> {
    check(resp).await.map(drop)
}

async fn check(resp: Response) -> Result<Response, Error> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = parse_retry_after(resp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()));
    let body = resp.bytes().await.unwrap_or_default();
    let err = server_error(status.as_u16(), retry_after, &body);
    tracing::debug!(status = status.as_u16(), code = ?err.server_code(), "server error");
    Err(err)
}
