"""A deterministic synthetic visual world: scenes of coloured shapes, and conversations about them.

Design note
-----------
The world is small on purpose: a tiny Owl3 (tiny vision tower, a few CPU-minutes of training) must be able
to learn it. So images are low resolution (64x64 by default), shapes are solid, aliased and never overlap,
backgrounds are light and low-contrast, and every answer is a short canonical string from a closed
vocabulary (except captions, which are canonical compositions of that vocabulary).

* **Scenes are data.** A `Scene` is a background plus a tuple of `Obj(kind, colour, size, x, y)` (pixel
  centres on a given `image_size`). `render()` draws it; every answer is computed from the Scene objects,
  never from pixels. Objects sit in the cells of a 3x3 grid (at most one per cell, a small jitter that keeps
  them inside their cell), so positions have exact names ("top left", "center", ...).
* **Vocabulary.** kinds: circle square triangle diamond cross; colours: red orange yellow green blue
  purple; sizes: small large; backgrounds: white gray stripes noise, each in a few variants (levels,
  stripe phases, noise seeds; never asked about: a nuisance factor that also keeps images distinct).
* **Tasks** (`task` field; answers in brackets):
    single/colour     What colour is the circle in the image?               [red]
    single/shape      What shape is the red object in the image?            [circle]
    single/count      How many circles are there in the image?              [1..4]
    single/count_all  How many shapes are there in the image?               [1..4]
    single/position   Where is the red circle in the image?                 [top left|top|...|center|...]
    single/relation   Is the red circle left of the blue square in the image? [yes|no]
    single/size       Is the red circle in the image small or large?        [small|large]
    single/caption    Describe the image.                                   [a red circle and a blue square]
    multi/which       Which image has a red circle? (2-4 images)            [image 2]
    multi/same        Are the two images the same?                          [yes|no]
    multi/diff        What is different between the two images?             [colour|shape|size|position|count]
    video/direction   Which way does the red circle move?                   [left|right|up|down]
    video/appear      What appears in the video?                            [a red circle]
    video/disappear   What disappears in the video?                         [a red circle]
    video/order       Which appears first, the red circle or the blue square? [the red circle]
    distractor/<t>    a single/<t> question about image k among N+1 images  [as single/<t>]
  Each task has 2-3 paraphrased templates; the answer never depends on the wording. Objects referred to
  by name are unique in their scene, so every question has exactly one answer. Answers are balanced by
  construction (the answer is drawn first, the scene built to match), tasks round-robin within a group.
  Captions list objects in reading order (row by row, left to right) without sizes: "a red circle, an
  orange square and a blue cross".
* **The drawn look** (`drawn=P`, `hyperowl data synth --drawn P`; issue 31): the same world, tasks and answers,
  drawn as people draw: a share P of the examples gets a source size (48-1024 px), continuous object sizes
  named relative to the image, free centres within each object's third of the image (so positions and
  relations stay exact), and a `Scene.look` seed from which `rendering.render_drawn` takes anti-aliasing,
  outlines, jittered colours, textured/gradient backgrounds and JPEG; the writer reduces each image to
  `image_size` with the processor's resize. Drawn videos have 4 to 32 frames. Plain datasets are unchanged.
  `ood.py` writes a test-only set drawn by another renderer (matplotlib): `hyperowl data ood`.
* **Videos** are `video_frames` scenes (default 8) sharing one background; events are at least two frames
  from either end (appear/disappear) or apart (order), so sample *all* frames when reading them back.
  They are written as real .mp4 files with PyAV (libx264 4:4:4 lossless when available, else MPEG-4 at
  high quality), `fps` frames per second (default 4).
* **Determinism.** Example i of a split is built from its own RNG, seeded by sha256(seed, split, i,
  attempt), so outputs are bit-identical for equal arguments (x264 runs single-threaded for that) and an
  example does not change when other counts change.
* **Disjoint splits.** A scene's hash is the sha1 of its canonical JSON (background and its variant, image
  size, sorted objects with pixel positions): equal hashes <=> identical images. Each split writes the
  hashes of every image and video frame it uses to `<split>.scenes.txt`; a later split (order train, val,
  test) rejects any example that uses a hash of an earlier split and redraws it (next attempt). Distinct
  hashes can still be near-duplicates (the same objects in the same cells, 2 px apart); `meta.json`
  reports that "layout overlap" per split so it is visible.

Output format (what the training pipeline reads)
------------------------------------------------
`<out>/<split>.jsonl`, one JSON object per line; media paths are relative to the JSONL's directory::

    {"id": "train-000123", "task": "single/colour",
     "messages": [{"role": "user", "content": "<|image|>What colour is the circle in the image?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["train/images/000123_0.png"], "videos": [], "answer": "red"}

One `<|image|>` per entry of "images" and one `<|video|>` per entry of "videos", in order. Multi-image and
distractor prompts label each image: "Image 1: <|image|>\\nImage 2: <|image|>\\nWhich image has a red
circle?"; video prompts are "<|video|>Which way does the red circle move?". Also written: `<split>/images/`
(PNG), `<split>/videos/` (mp4), `<split>.scenes.txt` (scene hashes); `write_dataset` adds `meta.json`
(settings, counts per task, the answer vocabulary, prompt lengths) and a `README.md`.

API: `iter_examples` (in memory: `Example` with scenes, PIL images and frame lists), `generate_split`,
`write_dataset`, `examples` (a few files for a README), `synth_main` (the `hyperowl data synth` CLI);
`random_scene` + `patch_labels` (per-patch kind/colour/size/cell targets) feed vision-tower pretraining
(`hyperowl.train.vision_pretrain`).

Layout (one module per concept; each imports only the ones above it in this list, and `Scene.render`
imports `rendering` only when it is called):

    world.py          the vocabulary, `Obj`, `Scene`, the grid geometry, `_Builder` / `random_scene`
    rendering.py      scenes to pixels (`render`), per-pixel and per-patch object labels
    questions.py      task names, templates, questions drawn for new scenes or asked about given ones
    conversations.py  `Example`, `build_example`, the extra turns (`add_turns`, `add_intro`, ...)
    splits.py         split plans, per-example seeds, option checks, `iter_examples` (no files)
    writer.py         files: JSONL, PNG, mp4, scene hashes, `meta.json`, `generate_split`, `write_dataset`
    cli.py            `hyperowl data synth` arguments (`synth_main`)
    ood.py            the out-of-distribution test set drawn by matplotlib (`hyperowl data ood`; imported on use)

This package re-exports their public names, so `from hyperowl.data.synthetic import X` and
`syn.X` work as they did when all of it was one module.
"""

from .world import (ALL_CELLS, BACKGROUNDS, BG_VARIANTS, CHANGES, COLOUR_NAMES, COLOURS, DIRECTIONS, GRID, KINDS,
                    MAX_OBJECTS, PLURALS, POSITION_NAMES, RELATIONS, SIZE_FRACTION, SIZES, Cell, Obj, Scene,
                    cell_centre, diameter, max_jitter, phrase, random_scene)
from .world import DRAWN_BACKGROUNDS, DRAWN_SIZE_FRACTION, DRAWN_SOURCE_SIZES, DRAWN_VIDEO_FRAMES, FREE_TASKS
from .rendering import (DRAWN_RENDER_SIDE, MIN_PATCH_PIXELS, PATCH_LABELS, DrawnStyle, drawn_background, jitter_colour,
                        nearest_colour, object_map, patch_labels, render, render_drawn)
from .questions import (ALL_TASKS, GROUPS, MULTI_TASKS, MULTI_TEMPLATES, SINGLE_TASKS, SINGLE_TEMPLATES, VIDEO_TASKS,
                        VIDEO_TEMPLATES, ask)
from .conversations import (FRAME_REFS, IMAGE_TOKEN, SINGLE_REFS, VIDEO_TOKEN, Example, add_intro, add_turns,
                            add_video_turns, add_which_turns, build_example)
from .splits import DEFAULT_MIX, DEFAULT_SIZES, MAX_ATTEMPTS, SPLITS, iter_examples
from .writer import examples, generate_split, read_scene_hashes, video_codec, write_dataset, write_mp4
from .cli import synth_main

# Private, but imported from here by scripts/probe_index.py (it builds its own probe scenes and prompts).
from .world import _Builder  # noqa: F401
from .conversations import _labelled  # noqa: F401

__all__ = [
    # world
    "ALL_CELLS", "BACKGROUNDS", "BG_VARIANTS", "CHANGES", "COLOUR_NAMES", "COLOURS", "DIRECTIONS", "GRID", "KINDS",
    "MAX_OBJECTS", "PLURALS", "POSITION_NAMES", "RELATIONS", "SIZE_FRACTION", "SIZES", "Cell", "Obj", "Scene",
    "cell_centre", "diameter", "max_jitter", "phrase", "random_scene",
    "DRAWN_BACKGROUNDS", "DRAWN_SIZE_FRACTION", "DRAWN_SOURCE_SIZES", "DRAWN_VIDEO_FRAMES", "FREE_TASKS",
    # rendering
    "MIN_PATCH_PIXELS", "PATCH_LABELS", "object_map", "patch_labels", "render",
    "DRAWN_RENDER_SIDE", "DrawnStyle", "drawn_background", "jitter_colour", "nearest_colour", "render_drawn",
    # questions
    "ALL_TASKS", "GROUPS", "MULTI_TASKS", "MULTI_TEMPLATES", "SINGLE_TASKS", "SINGLE_TEMPLATES", "VIDEO_TASKS",
    "VIDEO_TEMPLATES", "ask",
    # conversations
    "FRAME_REFS", "IMAGE_TOKEN", "SINGLE_REFS", "VIDEO_TOKEN", "Example", "add_intro", "add_turns",
    "add_video_turns", "add_which_turns", "build_example",
    # splits
    "DEFAULT_MIX", "DEFAULT_SIZES", "MAX_ATTEMPTS", "SPLITS", "iter_examples",
    # writer
    "examples", "generate_split", "read_scene_hashes", "video_codec", "write_dataset", "write_mp4",
    # cli
    "synth_main",
]
