"""KModel: our own PyTorch implementation of Kokoro-82M v1.0.

This package is the only place that imports torch. It never imports serving code.
"""
