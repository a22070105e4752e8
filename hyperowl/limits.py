"""Media and sampling limits: one definition for the library, the CLI and the server.

Design note: the same image must get the same answer whichever way it comes in. The library
(`processing.images.load_image`, `processing.video`) enforces the pixel and frame limits for every caller, the
CLI reads them from the library, and the server's defaults (`serve.media`, `ServeConfig`, `hyperowl serve`
flags) are these numbers, which an operator may lower or raise per server.

  * pixels: width x height of one image, checked from the header before anything is decoded (a
    "decompression bomb" of 144 megapixels is refused, not decoded with a PIL warning). Decoded RGB at the
    limit is ~200 MB; the model resizes every image to a few crops anyway.
  * bytes: one image or video *carried by a request* (data: URL, file or http(s) download on the server).
    A local file given to the library or the CLI is read from disk as it decodes, so its memory is bounded
    by the pixel and frame limits, not by its size; no byte limit applies to it.
  * frames: frames sampled from one video. Pixels are decoded and encoded in chunks, but every frame
    becomes visual tokens the model attends to; far more than a long-video recipe uses is a mistake.

  * seed: what a 64-bit generator takes (torch.Generator.manual_seed; a negative s acts as 2**64 - 1 + s).
    Out of range is refused everywhere, never reduced, so one seed always means one answer.

The module attributes are read when a check runs, so a program may change them (e.g.
`hyperowl.limits.MAX_IMAGE_PIXELS = 100 * 2**20`) before loading its media.
"""

from __future__ import annotations

MAX_IMAGE_PIXELS = 64 * 2**20  # width * height of one image
MAX_MEDIA_BYTES = 50 * 2**20  # one image or video in a server request (the server's --max-media-mb default)
MAX_FRAMES = 1024  # frames sampled from one video (--frames, max_frames=)
DEFAULT_FRAMES = 16  # frames sampled from one video when the caller does not say
SEED_RANGE = (-2**63, 2**64 - 1)  # sampling seeds (engine, server, CLI --seed)
