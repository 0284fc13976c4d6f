"""Tools around the library, not part of it: the demo, the rate-distortion evaluation against
classical codecs, image-quality metrics, the rANS throughput demo, timing helpers for the
benchmarks and the command line (``python -m dualres_ext``).

The library (``dualres_ext.codec``, ``ops``, ``models``, ...) never imports from here.
"""
