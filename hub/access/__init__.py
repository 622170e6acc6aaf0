"""Who reaches what over SSH: the server, credentials, the registrar, the console gateway and
jump host, and the hub's own SSH client to devices."""
