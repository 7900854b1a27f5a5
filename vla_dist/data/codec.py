"""Episode <-> WebDataset sample, and the image codecs the samples use.

One sample per episode, keyed by the episode id:

    <episode_id>.meta.json      JSON: ids, task, instruction, seed, success, fps, sizes, codec
    <episode_id>.state.npy      float32 [T, S]  (np.save bytes; read back with allow_pickle=False)
    <episode_id>.actions.npy    float32 [T, A]
    <episode_id>.object_pos.npy float32 [T, 3]: the red cube's centre from simulator state (when recorded;
                                meta.json says so with "object_dim")
    <episode_id>.<cam>.<codec>  one video per camera, uint8 [T, H, W, 3] once decoded

Codecs: "mp4" is H.264 (lossy, small; needs even H and W because of 4:2:0 chroma), "npz" is
`np.savez_compressed` (lossless, zlib). Both are encoded and decoded entirely in memory.
"""

from __future__ import annotations

import functools
import io
import json
import platform
import re
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

from vla_dist.data.episode import Episode

IMAGE_CODECS = ("mp4", "npz")

# x264 constant-rate-factor for training data: 18 is the usual "visually lossless" point. Measured on
# 64x64 sim-like frames (python -m vla_dist.bench.codec): ~20 KB per 60-frame camera video, mean
# pixel error ~2-3 (see MP4_PIX_FMT). x264's default 23 saves ~35% of the bytes
# but raises the error on small objects, which is exactly what a 64x64 policy has to see.
MP4_CRF = 18
# Speed only changes encode time and size, not decodability. "medium" is x264's default; on 64x64
# frames one episode encodes in a few ms either way, so we do not trade size for speed here.
MP4_PRESET = "medium"
# Shard data is yuv444p: 4:2:0 leaves a 64x64 image a 32x32 colour plane, so the edge of a small
# coloured object (the cubes) is off by >100 in one channel (mean error ~3, PSNR ~30 dB), while
# yuv444p keeps full colour at the same size (bench: max error 57-81, mean ~1.8, PSNR ~39 dB). Some
# players cannot show 4:4:4, which is why videos for people (video.py) stay yuv420p. The decoder
# here reads either.
MP4_PIX_FMT = "yuv444p"
# Tiny frames gain nothing from threads (x264's, the decoder's, swscale's), and sim actors and data
# workers already run in parallel: PyAV's default of automatic threads made decoding a 64x64 episode
# 5-50x slower here. One thread also makes the bytes independent of the machine's core count.
_THREADS = 1
# CPU features x264's AVX2 code path needs (Linux /proc/cpuinfo names), see _x264_params.
_AVX2_FLAGS = {"avx", "avx2", "fma", "bmi1", "bmi2", "abm"}
# RGB <-> YUV conversion: exact rounding and full-resolution chroma (the defaults round and
# interpolate the colour planes coarsely, adding error that H.264 did not cause).
_SWS_FLAGS = (
    Interpolation.BILINEAR
    | Interpolation.ACCURATE_RND
    | Interpolation.FULL_CHR_H_INT
    | Interpolation.FULL_CHR_H_INP
)

# Names become tar member names "<key>.<cam>.<codec>": webdataset splits the key at the first dot
# and treats "/" as a directory, so both are refused; USTAR tar caps a member name at 100 bytes.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_MAX_MEMBER_NAME = 100
_RESERVED_FIELDS = ("meta", "state", "actions", "object_pos")

META_KEY = "meta.json"
STATE_KEY = "state.npy"
ACTIONS_KEY = "actions.npy"
OBJECT_POS_KEY = "object_pos.npy"
# Keys webdataset's tar iteration adds to a sample; never written by us, ignored when decoding.
_ITERATOR_KEYS = ("__key__", "__url__", "__local_path__")


# ---------------------------------------------------------------------------------------------
# image codecs


def encode_frames(frames: np.ndarray, codec: str, fps: float) -> bytes:
    """Encode one camera's uint8 [T, H, W, 3] frames; `fps` is only stored (mp4 timestamps)."""
    _check_frames(frames)
    if codec == "mp4":
        return encode_h264(frames, fps, crf=MP4_CRF)
    if codec == "npz":
        buf = io.BytesIO()
        np.savez_compressed(buf, frames=frames)
        return buf.getvalue()
    raise ValueError(f"unknown image codec {codec!r}; expected one of {IMAGE_CODECS}")


def decode_frames(data: bytes, codec: str) -> np.ndarray:
    """Decode bytes from `encode_frames` back to uint8 [T, H, W, 3]."""
    if codec == "mp4":
        frames = decode_h264(data)
    elif codec == "npz":
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            if set(archive.files) != {"frames"}:
                raise ValueError(f"npz frames: expected one array 'frames', found {archive.files}")
            frames = archive["frames"]
    else:
        raise ValueError(f"unknown image codec {codec!r}; expected one of {IMAGE_CODECS}")
    _check_frames(frames)
    return frames


def encode_h264(frames: np.ndarray, fps: float, *, crf: int, pix_fmt: str = MP4_PIX_FMT) -> bytes:
    """H.264 (libx264) in an mp4 container, in memory. H and W must be even."""
    buf = io.BytesIO()
    _write_h264(buf, frames, fps, crf=crf, pix_fmt=pix_fmt, container_options={})
    return buf.getvalue()


def write_h264(path: str, frames: np.ndarray, fps: float, *, crf: int, pix_fmt: str = "yuv420p") -> None:
    """Like `encode_h264` but to a file, with the index first ("faststart") so browsers can start
    playing before the whole file has arrived (ffmpeg rewrites the file for that, so not in memory)."""
    _write_h264(path, frames, fps, crf=crf, pix_fmt=pix_fmt, container_options={"movflags": "+faststart"})


def _write_h264(
    output: str | io.BytesIO,
    frames: np.ndarray,
    fps: float,
    *,
    crf: int,
    pix_fmt: str,
    container_options: dict[str, str],
) -> None:
    _check_frames(frames)
    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(
            f"mp4 needs even frame sizes (4:2:0 chroma is subsampled 2x2); got {height}x{width}. "
            "Use an even image size or the npz codec."
        )
    rate = Fraction(fps).limit_denominator(1000)
    reformatter = VideoReformatter()
    with av.open(output, mode="w", format="mp4", options=container_options) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        stream.codec_context.thread_count = _THREADS
        stream.options = {"crf": str(crf), "preset": MP4_PRESET, **_x264_params()}
        for index in range(num_frames):
            rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[index]), format="rgb24")
            # converted here, not by the encoder, to control swscale's threads and rounding
            frame = reformatter.reformat(rgb, format=pix_fmt, interpolation=_SWS_FLAGS, threads=_THREADS)
            frame.pts = index
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the frames x264 holds back for lookahead


@functools.cache
def _x264_params() -> dict[str, str]:
    """Keep x264 off its AVX-512 code. On an AVX-512 CPU (measured: AMD EPYC, x264 in PyAV 18's
    FFmpeg) the same frames encoded twice in one process gave different bytes about one time in
    three at <= 64x64; limited to AVX2 the bytes repeat and encoding is as fast. Only where every
    feature the AVX2 path uses is listed in /proc/cpuinfo: naming a missing one would crash."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags_line = next((line for line in f if line.startswith("flags")), "flags:")
    except OSError:
        return {}
    flags = set(flags_line.split(":", 1)[1].split())
    if "avx512f" in flags and _AVX2_FLAGS <= flags:
        return {"x264-params": "asm=AVX2"}
    return {}


def decode_h264(data: bytes) -> np.ndarray:
    reformatter = VideoReformatter()
    with av.open(io.BytesIO(data), mode="r", format="mp4") as container:
        if len(container.streams.video) != 1:
            raise ValueError(f"mp4 frames: expected one video stream, found {len(container.streams.video)}")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = _THREADS
        decoded = [
            reformatter.reformat(frame, format="rgb24", interpolation=_SWS_FLAGS, threads=_THREADS)
            .to_ndarray()
            for frame in container.decode(stream)
        ]
    if not decoded:
        raise ValueError("mp4 frames: no frame decoded")
    return np.stack(decoded)


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(f"frames must be a uint8 ndarray, got {getattr(frames, 'dtype', type(frames))}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) == 0:
        raise ValueError(f"frames must be [T, H, W, 3] with T, H, W > 0; got shape {frames.shape}")


# ---------------------------------------------------------------------------------------------
# episode <-> sample


def encode_episode(ep: Episode, codec: str) -> dict[str, str | bytes]:
    """The WebDataset sample of one episode (all values bytes except `__key__`)."""
    if codec not in IMAGE_CODECS:
        raise ValueError(f"unknown image codec {codec!r}; expected one of {IMAGE_CODECS}")
    state, actions = _validate_episode(ep, codec)
    cameras = list(ep.frames)
    meta = {
        "episode_id": ep.episode_id,
        "task": ep.task,
        "instruction": ep.instruction,
        "seed": int(ep.seed),
        "success": bool(ep.success),
        "fps": float(ep.fps),
        "num_frames": int(actions.shape[0]),
        "cameras": cameras,
        "image_codec": codec,
        "image_hw": {cam: list(ep.frames[cam].shape[1:3]) for cam in cameras},
        "state_dim": int(state.shape[1]),
        "action_dim": int(actions.shape[1]),
    }
    if ep.look:
        meta["look"] = ep.look
    object_pos = _checked_object_pos(ep, actions.shape[0])
    if object_pos is not None:
        meta["object_dim"] = int(object_pos.shape[1])
    sample: dict[str, str | bytes] = {
        "__key__": ep.episode_id,
        META_KEY: json.dumps(meta, sort_keys=True).encode("utf-8"),
        STATE_KEY: _npy_bytes(state),
        ACTIONS_KEY: _npy_bytes(actions),
    }
    if object_pos is not None:
        sample[OBJECT_POS_KEY] = _npy_bytes(object_pos)
    for cam in cameras:
        sample[f"{cam}.{codec}"] = encode_frames(ep.frames[cam], codec, ep.fps)
    return sample


def decode_sample(sample: dict[str, object], decode_images: bool = True) -> Episode:
    """Episode from a raw sample (bytes values, as the tar holds them). Raises ValueError on any key
    we did not write: nothing is ever decoded by extension (a `.pyd` would be unpickled)."""
    key = sample.get("__key__")
    if not isinstance(key, str):
        raise ValueError(f"sample has no string __key__ (keys: {sorted(sample)})")  # noqa: TRY004  (malformed data, not a caller's type error: readers catch ValueError)
    if META_KEY not in sample:
        raise ValueError(f"sample {key!r}: missing {META_KEY}")
    try:
        meta = json.loads(_as_bytes(sample[META_KEY], key, META_KEY).decode("utf-8"))
        codec, cameras, num_frames = meta["image_codec"], list(meta["cameras"]), int(meta["num_frames"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"sample {key!r}: bad {META_KEY}: {exc!r}") from exc
    if meta.get("episode_id") != key:
        raise ValueError(f"sample {key!r}: meta.json says episode_id={meta.get('episode_id')!r}")
    if codec not in IMAGE_CODECS:
        raise ValueError(f"sample {key!r}: unknown image codec {codec!r}")

    expected = {META_KEY, STATE_KEY, ACTIONS_KEY} | {f"{cam}.{codec}" for cam in cameras}
    if "object_dim" in meta:
        expected.add(OBJECT_POS_KEY)
    present = {k for k in sample if k not in _ITERATOR_KEYS}
    if present - expected:
        raise ValueError(f"sample {key!r}: unexpected keys {sorted(present - expected)} (never decoded)")
    if expected - present:
        raise ValueError(f"sample {key!r}: missing keys {sorted(expected - present)}")

    state = _load_npy(_as_bytes(sample[STATE_KEY], key, STATE_KEY), key, STATE_KEY, num_frames)
    actions = _load_npy(_as_bytes(sample[ACTIONS_KEY], key, ACTIONS_KEY), key, ACTIONS_KEY, num_frames)
    object_pos = np.zeros((0, 0), np.float32)
    if OBJECT_POS_KEY in expected:
        object_pos = _load_npy(_as_bytes(sample[OBJECT_POS_KEY], key, OBJECT_POS_KEY), key, OBJECT_POS_KEY,
                               num_frames)
    frames: dict[str, np.ndarray] = {}
    if decode_images:
        for cam in cameras:
            name = f"{cam}.{codec}"
            video = decode_frames(_as_bytes(sample[name], key, name), codec)
            height, width = meta.get("image_hw", {}).get(cam, video.shape[1:3])
            if video.shape[:3] != (num_frames, height, width):
                raise ValueError(
                    f"sample {key!r}: {name} decoded to {video.shape[:3]}, "
                    f"expected {(num_frames, height, width)}"
                )
            frames[cam] = video
    return Episode(
        episode_id=key,
        task=str(meta["task"]),
        instruction=str(meta["instruction"]),
        seed=int(meta["seed"]),
        success=bool(meta["success"]),
        fps=float(meta["fps"]),
        frames=frames,
        state=state,
        actions=actions,
        look=dict(meta.get("look") or {}),
        object_pos=object_pos,
    )


def _validate_episode(ep: Episode, codec: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(ep.episode_id, str) or not _NAME_RE.match(ep.episode_id):
        raise ValueError(
            f"episode_id {ep.episode_id!r} must match {_NAME_RE.pattern} (no '.', '/', spaces): "
            "it is the tar sample key"
        )
    if not (np.isfinite(ep.fps) and ep.fps > 0):
        raise ValueError(f"episode {ep.episode_id}: fps must be > 0, got {ep.fps}")
    state = np.asarray(ep.state)
    actions = np.asarray(ep.actions)
    for name, array in (("state", state), ("actions", actions)):
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
            raise ValueError(
                f"episode {ep.episode_id}: {name} must be a numeric [T, D] array, got {array.shape}"
            )
    num_frames = actions.shape[0]
    if num_frames == 0:
        raise ValueError(f"episode {ep.episode_id}: no frames")
    if state.shape[0] != num_frames:
        raise ValueError(f"episode {ep.episode_id}: state has {state.shape[0]} steps, actions {num_frames}")
    if not ep.frames:
        raise ValueError(f"episode {ep.episode_id}: no camera frames")
    for cam, frames in ep.frames.items():
        if not isinstance(cam, str) or not _NAME_RE.match(cam) or cam in _RESERVED_FIELDS:
            raise ValueError(f"episode {ep.episode_id}: camera name {cam!r} must match {_NAME_RE.pattern} "
                             f"and not be one of {_RESERVED_FIELDS}")
        member = f"{ep.episode_id}.{cam}.{codec}"
        if len(member.encode("utf-8")) > _MAX_MEMBER_NAME:
            raise ValueError(f"tar member name {member!r} is over {_MAX_MEMBER_NAME} bytes (USTAR limit)")
        _check_frames(frames)
        if frames.shape[0] != num_frames:
            raise ValueError(f"episode {ep.episode_id}: camera {cam} has {frames.shape[0]} frames, "
                             f"actions have {num_frames} steps")
    return state.astype(np.float32, copy=False), actions.astype(np.float32, copy=False)


def _checked_object_pos(ep: Episode, num_frames: int) -> np.ndarray | None:
    """The episode's object positions as float32 [T, D], or None when it has none."""
    object_pos = np.asarray(ep.object_pos)
    if object_pos.size == 0:
        return None
    if object_pos.ndim != 2 or object_pos.shape[0] != num_frames or not np.isfinite(object_pos).all():
        raise ValueError(f"episode {ep.episode_id}: object_pos must be finite [T={num_frames}, D], "
                         f"got {object_pos.shape}")
    return object_pos.astype(np.float32, copy=False)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _load_npy(data: bytes, key: str, name: str, num_frames: int) -> np.ndarray:
    if not data.startswith(b"\x93NUMPY"):  # else np.load would try zip or pickle formats
        raise ValueError(f"sample {key!r}: {name} is not an .npy array")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:  # truncated data, object arrays, bad header
        raise ValueError(f"sample {key!r}: bad {name}: {exc}") from exc
    if array.dtype != np.float32 or array.ndim != 2:
        raise ValueError(f"sample {key!r}: {name} must be float32 [T, D], got {array.dtype} {array.shape}")
    if array.shape[0] != num_frames:
        raise ValueError(f"sample {key!r}: {name} has {array.shape[0]} steps, meta.json says {num_frames}")
    return array


def _as_bytes(value: object, key: str, name: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ValueError(f"sample {key!r}: {name} is {type(value).__name__}, expected raw bytes")
