"""rt_server: a real-time streaming text-to-speech server for Kokoro-82M v1.0."""

__version__ = "0.1.0"
