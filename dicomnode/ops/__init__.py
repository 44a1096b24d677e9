"""What operators read or run, read-only over the store and the pipeline: the node's status, the
jobs' and studies' history, Prometheus metrics, systemd notifications, `dicomnode inspect` and
`dicomnode models check`."""
