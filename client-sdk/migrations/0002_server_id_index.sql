-- Finding a received message by sender and server id (redelivery after a lost ack).
CREATE INDEX messages_by_server_id ON messages (sender, server_msg_id);
