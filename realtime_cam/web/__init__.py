"""``realtime-cam serve``: the streams in a web browser (MJPEG per stream, a JSON endpoint, per-stream controls)."""
