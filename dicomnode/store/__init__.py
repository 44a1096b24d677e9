"""Durable state and the policies that act on it: the tables and the engine (with the schema and
its migrations), the event log, the components' heartbeats, the spool of received files, the
index of studies, series and instances, retention and the disk watermark."""
