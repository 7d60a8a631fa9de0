"""Robot recordings (rosbag2 ``.mcap``) as calibration data, without ROS.

Reads a recording in two streaming passes, so memory is bounded by the samples kept, not by
the length of the recording:

1. scan: every message's topic and time (payloads are not kept); the first message of every
   image topic and every std_msgs/String message are decoded to tell colour cameras from depth
   or mono streams and instructions from other strings (a URDF on /robot_description);
2. sample: the frames chosen from the scan (spread evenly over the usable part of the
   recording) are decoded when they stream past, each paired with the latest message of the
   other selected topics at that time.

Only ``mcap`` / ``mcap-ros2-support`` (pure Python) and numpy / OpenCV are used; nothing here
imports rclpy or the ROS node package. Images are decoded by this module's own converter
(``image_to_rgb``): sensor_msgs/Image in rgb8 / bgr8 / rgba8 / bgra8 (mono8 when a topic is
named explicitly) and sensor_msgs/CompressedImage in JPEG / PNG.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE, COMPRESSED)
TEXT = "std_msgs/msg/String"
JOINT_STATE = "sensor_msgs/msg/JointState"
COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8")
EXPLICIT_ENCODINGS = COLOR_ENCODINGS + ("mono8",)
# An instruction is a short sentence; a String topic with longer or XML-looking content (a URDF
# on /robot_description, a JSON blob) is something else.
MAX_INSTRUCTION_CHARS = 512
INSTRUCTION_HINTS = ("instruction", "task", "prompt", "language", "command", "goal_text")
STATE_HINTS = ("joint_states",)
# A pause in the reference camera longer than this (and longer than 10 frame periods) ends an
# episode; so does a change of the instruction.
EPISODE_GAP_S = 1.0


class RecordingError(ValueError):
    """A recording that cannot be used as it is: the message says why and what to do."""


def norm_topic(name: str) -> str:
    """ROS names without a namespace resolve under '/': 'camera/image_raw' == '/camera/image_raw'."""
    name = name.strip()
    return name if name.startswith("/") else "/" + name


# ---- images ----------------------------------------------------------------------------------
def _image_rgb(msg, allow_mono: bool) -> np.ndarray:
    enc = str(msg.encoding).lower()
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}.get(enc)
    if channels is None or (enc == "mono8" and not allow_mono):
        raise RecordingError(
            f"image encoding {msg.encoding!r} is not a colour camera (accepted: "
            f"{', '.join(COLOR_ENCODINGS)}; mono8 when the topic is named explicitly)"
        )
    data = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    if h <= 0 or w <= 0 or step < w * channels or data.size < step * h:
        raise RecordingError(f"image {w}x{h} {enc}: step {step} and {data.size} data bytes do not fit")
    rows = data[: step * h].reshape(h, step)[:, : w * channels].reshape(h, w, channels)
    if enc == "mono8":
        return np.repeat(rows, 3, axis=2)
    if enc.startswith("bgr"):
        return np.ascontiguousarray(rows[..., 2::-1])
    return np.ascontiguousarray(rows[..., :3])


def _compressed_rgb(msg) -> np.ndarray:
    import cv2

    fmt = str(msg.format).lower()
    if "depth" in fmt or "16uc1" in fmt or "32fc1" in fmt:
        raise RecordingError(f"compressed image format {msg.format!r} is a depth stream, not a colour camera")
    bgr = cv2.imdecode(np.frombuffer(bytes(msg.data), dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise RecordingError(f"compressed image (format {msg.format!r}) could not be decoded as JPEG / PNG")
    return np.ascontiguousarray(bgr[..., ::-1])


def image_to_rgb(msg, schema: str, allow_mono: bool = False) -> np.ndarray:
    """An HxWx3 uint8 RGB array from a decoded sensor_msgs Image or CompressedImage."""
    return _image_rgb(msg, allow_mono) if schema == IMAGE else _compressed_rgb(msg)


def colour_problem(msg, schema: str) -> str | None:
    """Why this image topic is not a colour camera, or None when it is one."""
    if schema == IMAGE:
        enc = str(msg.encoding).lower()
        return None if enc in COLOR_ENCODINGS else f"encoding {msg.encoding}"
    fmt = str(msg.format).lower()
    if "depth" in fmt or "16uc1" in fmt or "32fc1" in fmt or "mono" in fmt:
        return f"format {msg.format}"
    return None


def instruction_problem(texts: list[str]) -> str | None:
    """Why a String topic's messages do not look like instructions, or None."""
    if not texts:
        return "no messages"
    longest = max(texts, key=len)
    if longest.lstrip().startswith(("<", "{", "[")):
        return "XML / JSON content"
    if len(longest) > MAX_INSTRUCTION_CHARS:
        return f"{len(longest)} characters"
    if not any(t.strip() for t in texts):
        return "empty"
    return None


# ---- reading ---------------------------------------------------------------------------------
def _natural(p: Path) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)]


def recording_files(path: Path) -> list[Path]:
    """The .mcap file, or a bag directory's files in recording order (bag_2 before bag_10)."""
    if not path.exists():
        raise RecordingError(f"{path}: no such file or bag directory")
    files = sorted(path.glob("*.mcap"), key=_natural) if path.is_dir() else [path]
    if not files:
        raise RecordingError(f"{path}: no .mcap files in this bag directory")
    return files


def _damaged(f: Path, e: Exception, messages: int) -> RecordingError:
    from mcap.exceptions import EndOfFile, InvalidMagic

    if isinstance(e, InvalidMagic) and messages == 0:
        return RecordingError(
            f"{f}: not an MCAP file (rosbag2 recordings in the sqlite3 format are "
            "not read: record with `ros2 bag record -s mcap` or convert with "
            "`ros2 bag convert`)"
        )
    if isinstance(e, (EndOfFile, EOFError)) or "end of file" in str(e).lower() or isinstance(e, InvalidMagic):
        return RecordingError(
            f"{f}: the recording ends early after {messages} readable messages (truncated: "
            "the recorder was killed or the disk filled up). Re-record, or rewrite the "
            "readable part into a new file with `mcap recover` (the MCAP command-line "
            "tool) and calibrate from that"
        )
    return RecordingError(f"{f}: damaged MCAP recording after {messages} readable messages ({type(e).__name__}: {e})")


def iter_raw(files: list[Path]) -> Iterator[tuple[str, str, int, bytes, object, object]]:
    """(topic, schema name, log time ns, payload, schema record, channel record) per message,
    file after file, streaming (indexed files in log-time order, others in file order)."""
    from mcap.reader import NonSeekingReader, SeekingReader

    for f in files:
        count = 0
        try:
            with open(f, "rb") as fh:
                try:
                    summary = SeekingReader(fh).get_summary()
                except Exception:  # no or damaged summary (truncated file): read it as a stream
                    summary = None
                fh.seek(0)
                if summary is not None and summary.chunk_indexes:
                    it = SeekingReader(fh).iter_messages(log_time_order=True)
                else:  # NonSeekingReader with log_time_order would load the whole file
                    it = NonSeekingReader(fh).iter_messages(log_time_order=False)
                for schema, channel, message in it:
                    count += 1
                    yield (
                        channel.topic,
                        schema.name if schema else "",
                        message.log_time,
                        message.data,
                        schema,
                        channel,
                    )
        except RecordingError:
            raise
        except Exception as e:  # the mcap reader raises several types for damaged files
            raise _damaged(f, e, count) from None


class _Decoders:
    """One mcap_ros2 decoder per (schema, encoding), made on first use."""

    def __init__(self):
        from mcap_ros2.decoder import DecoderFactory

        self._factory = DecoderFactory()
        self._cache: dict = {}

    def decode(self, schema, channel, data: bytes):
        # by content: schema ids and objects differ from file to file of a bag directory
        key = (schema.name, schema.encoding, schema.data, channel.message_encoding) if schema else None
        fn = self._cache.get(key)
        if fn is None:
            fn = self._factory.decoder_for(channel.message_encoding, schema)
            if fn is None:
                raise RecordingError(
                    f"topic {channel.topic}: cannot decode messages encoded as "
                    f"{channel.message_encoding!r} (accepted: cdr)"
                )
            self._cache[key] = fn
        return fn(data)


@dataclasses.dataclass
class TopicInfo:
    schema: str
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0
    problem: str | None = None  # why it is not a colour camera / an instruction
    texts: list = dataclasses.field(default_factory=list)  # String topics: (time, text) changes


@dataclasses.dataclass
class Scan:
    topics: dict[str, TopicInfo]
    image_times: dict[str, list[int]]  # per image topic, every message's log time
    messages: int


def scan(files: list[Path], progress: bool = False) -> Scan:
    """Pass 1: what is in the recording (no image payload is kept)."""
    from tqdm import tqdm

    dec = _Decoders()
    topics: dict[str, TopicInfo] = {}
    times: dict[str, list[int]] = {}
    bar = tqdm(desc="scanning recording", unit="msg", disable=not progress, file=sys.stderr, mininterval=0.5)
    n = 0
    for topic, schema_name, t, data, schema, channel in iter_raw(files):
        n += 1
        bar.update()
        info = topics.get(topic)
        if info is None:
            info = topics[topic] = TopicInfo(schema_name, first_ns=t, last_ns=t)
            if schema_name in IMAGE_TYPES:
                try:
                    info.problem = colour_problem(dec.decode(schema, channel, data), schema_name)
                except RecordingError:
                    raise
                except Exception as e:
                    info.problem = f"undecodable ({type(e).__name__})"
        info.count += 1
        info.first_ns, info.last_ns = min(info.first_ns, t), max(info.last_ns, t)
        if schema_name in IMAGE_TYPES:
            times.setdefault(topic, []).append(t)
        elif schema_name == TEXT and len(info.texts) < 1000:
            try:
                text = str(dec.decode(schema, channel, data).data)
            except Exception:
                continue
            if not info.texts or info.texts[-1][1] != text:
                info.texts.append((t, text[: MAX_INSTRUCTION_CHARS + 1]))
    bar.close()
    for info in topics.values():
        if info.schema == TEXT:
            info.problem = instruction_problem([s for _, s in info.texts])
    return Scan(topics, times, n)


# ---- topic selection -------------------------------------------------------------------------
@dataclasses.dataclass
class Selection:
    cameras: list[str]
    instruction: str | None  # None: fixed text
    state: str | None  # None: zeros
    notes: list[str]


def _listing(s: Scan) -> str:
    rows = []
    for t, i in sorted(s.topics.items()):
        extra = f", not used: {i.problem}" if i.problem else ""
        rows.append(f"{t} ({i.schema}, {i.count} msgs{extra})")
    return "; ".join(rows) or "no messages"


def select_topics(
    s: Scan,
    where: str,
    max_cameras: int,
    camera_topics=None,
    instruction_topic=None,
    state_topic=None,
    instruction_text: str | None = None,
) -> Selection:
    """Cameras, instruction and state topics: the named ones (checked), else chosen from the scan."""
    notes: list[str] = []
    missing: list[str] = []
    found = {norm_topic(t): t for t in s.topics}

    def named(t: str, kinds: tuple, what: str, flag: str) -> str:
        real = found.get(norm_topic(t))
        if real is None:
            raise RecordingError(f"{where}: {what} topic {t!r} ({flag}) is not in the recording; found: {_listing(s)}")
        if s.topics[real].schema not in kinds:
            raise RecordingError(
                f"{where}: {what} topic {t!r} ({flag}) is {s.topics[real].schema}, accepted: {', '.join(kinds)}"
            )
        return real

    if camera_topics:
        cams = [named(t, IMAGE_TYPES, "camera", "--camera-topics") for t in camera_topics]
        for c in cams:
            prob = s.topics[c].problem
            if prob and not prob.startswith("encoding mono8"):
                raise RecordingError(f"{where}: camera topic {c} is not a colour camera ({prob})")
        if len(cams) > max_cameras:
            raise RecordingError(f"{where}: {len(cams)} camera topics named, the model takes at most {max_cameras}")
    else:
        colour = sorted(t for t, i in s.topics.items() if i.schema in IMAGE_TYPES and not i.problem)
        skipped = sorted(f"{t} ({i.problem})" for t, i in s.topics.items() if i.schema in IMAGE_TYPES and i.problem)
        if not colour:
            missing.append(
                f"a colour camera topic (sensor_msgs/Image in {'/'.join(COLOR_ENCODINGS)} or a "
                "JPEG/PNG sensor_msgs/CompressedImage; --camera-topics)"
            )
        cams = colour[:max_cameras]
        if skipped:
            notes.append(f"not cameras: {', '.join(skipped)}")
        if len(colour) > max_cameras:
            notes.append(
                f"the model takes {max_cameras} camera(s): left out {', '.join(colour[max_cameras:])} "
                "(--camera-topics picks them)"
            )

    instr = None
    if instruction_text is not None:
        if instruction_topic:
            raise RecordingError("give an instruction topic or a fixed instruction text, not both")
    elif instruction_topic:
        instr = named(instruction_topic, (TEXT,), "instruction", "--instruction-topic")
    else:
        cands = [t for t, i in s.topics.items() if i.schema == TEXT and not i.problem]
        other = sorted(f"{t} ({i.problem})" for t, i in s.topics.items() if i.schema == TEXT and i.problem)
        hinted = [t for t in cands if any(h in t.lower() for h in INSTRUCTION_HINTS)]
        pick = hinted if len(hinted) >= 1 else cands
        if not pick:
            missing.append(
                "an instruction topic (std_msgs/String with short text; --instruction-topic, "
                "or the task as text with --instruction)"
            )
        elif len(pick) > 1:
            raise RecordingError(
                f"{where}: several String topics could be the instruction "
                f"({', '.join(sorted(pick))}): name one with --instruction-topic"
            )
        instr = pick[0] if pick else None
        if other:
            notes.append(f"not instructions: {', '.join(other)}")

    state = None
    if state_topic is not None and state_topic.lower() in ("", "none"):
        notes.append("no state topic: states are zeros")
    elif state_topic:
        state = named(state_topic, (JOINT_STATE,), "state", "--state-topic")
    else:
        cands = sorted(t for t, i in s.topics.items() if i.schema == JOINT_STATE)
        hinted = [t for t in cands if any(t.rstrip("/").endswith(h) for h in STATE_HINTS)]
        pick = hinted if len(hinted) == 1 else cands
        if not pick:
            missing.append("a sensor_msgs/JointState topic (--state-topic, or --state-topic none for zero states)")
        elif len(pick) > 1:
            raise RecordingError(f"{where}: several JointState topics ({', '.join(pick)}): name one with --state-topic")
        state = pick[0] if pick else None
    if missing:
        raise RecordingError(f"{where}: calibration needs {'; '.join(missing)}. Found: {_listing(s)}")
    return Selection(cams, instr, state, notes)


# ---- sampling --------------------------------------------------------------------------------
def _episodes(times: np.ndarray, instr_changes: list[int]) -> np.ndarray:
    """Episode id per reference frame: a new episode after a pause or an instruction change."""
    if times.size == 0:
        return np.zeros(0, dtype=np.int64)
    gaps = np.diff(times)
    period = float(np.median(gaps)) if gaps.size else 0.0
    limit = max(EPISODE_GAP_S * 1e9, 10 * period)
    new = np.zeros(times.size, dtype=bool)
    new[1:] = gaps > limit
    for t in instr_changes:
        k = int(np.searchsorted(times, t))
        if 0 < k < times.size:
            new[k] = True
    return np.cumsum(new)


def spread(count: int, n: int | None) -> np.ndarray:
    """n indices spread evenly over range(count) (all of them when n is None or >= count)."""
    if n is None or n >= count:
        return np.arange(count)
    return np.unique(np.round(np.linspace(0, count - 1, n)).astype(np.int64))


@dataclasses.dataclass
class Sample:
    images: list
    instruction: str
    state: np.ndarray
    time_ns: int
    episode: int


def read_samples(
    path: Path,
    state_dim: int,
    max_cameras: int,
    n: int | None,
    *,
    camera_topics=None,
    instruction_topic=None,
    state_topic=None,
    instruction_text: str | None = None,
    progress: bool = False,
    log=None,
) -> tuple[list[Sample], Selection, dict]:
    """``n`` observations spread evenly over the recording (all frames when n is None), in time
    order, with their time and episode; plus the topic selection and a summary dict."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    files = recording_files(path)
    s = scan(files, progress)
    sel = select_topics(s, str(path), max_cameras, camera_topics, instruction_topic, state_topic, instruction_text)
    ref = sel.cameras[0]
    needed = list(sel.cameras) + [t for t in (sel.instruction, sel.state) if t]
    ready = max(s.topics[t].first_ns for t in needed)
    times = np.asarray(s.image_times[ref], dtype=np.int64)
    order = np.argsort(times, kind="stable")
    usable = order[times[order] >= ready]  # message numbers (arrival order) of usable reference frames
    if usable.size == 0:
        raise RecordingError(
            f"{path}: no frame of {ref} arrived after the first message of every other selected "
            f"topic ({', '.join(needed[1:]) or 'none'})"
        )
    utimes = times[usable]
    changes = [t for t, _ in s.topics[sel.instruction].texts[1:]] if sel.instruction else []
    episodes = _episodes(utimes, changes)
    pick = spread(usable.size, n)
    wanted = {int(usable[i]): (int(utimes[i]), int(episodes[i])) for i in pick}
    dur = (utimes[-1] - utimes[0]) / 1e9
    log(
        f"[calibration] {path.name}: cameras {', '.join(sel.cameras)}; instruction "
        f"{sel.instruction or repr(instruction_text)}; state {sel.state or 'zeros'}"
    )
    for note in sel.notes:
        log(f"[calibration]   {note}")
    log(
        f"[calibration]   {len(wanted)} of {usable.size} frames over {dur:.1f} s "
        f"({int(episodes[-1]) + 1} episode(s)), spread evenly"
    )

    from tqdm import tqdm

    dec = _Decoders()
    latest: dict[str, tuple] = {}
    out: list[Sample] = []
    ref_seen = -1
    keep = set(needed)
    bar = tqdm(
        total=s.messages, desc="sampling recording", unit="msg", disable=not progress, file=sys.stderr, mininterval=0.5
    )
    for topic, schema_name, t, data, schema, channel in iter_raw(files):
        bar.update()
        if topic not in keep:
            continue
        latest[topic] = (schema_name, data, schema, channel)
        if topic != ref:
            continue
        ref_seen += 1
        if ref_seen not in wanted:
            continue
        t_ns, ep = wanted.pop(ref_seen)
        if not keep <= latest.keys():  # an unindexed file out of time order: not ready yet
            continue
        images = []
        for cam in sel.cameras:
            sn, d, sc, ch = latest[cam]
            try:
                images.append(image_to_rgb(dec.decode(sc, ch, d), sn, allow_mono=camera_topics is not None))
            except RecordingError as e:
                raise RecordingError(f"{path}: {cam} at t={(t_ns - utimes[0]) / 1e9:.2f} s: {e}") from None
        if sel.instruction is None:
            text = instruction_text
        else:
            _, d, sc, ch = latest[sel.instruction]
            text = str(dec.decode(sc, ch, d).data)
        state = np.zeros(state_dim, dtype=np.float32)
        if sel.state:
            _, d, sc, ch = latest[sel.state]
            pos = np.asarray(list(dec.decode(sc, ch, d).position), dtype=np.float32)[:state_dim]
            if not np.all(np.isfinite(pos)):
                continue
            state[: pos.size] = pos
        out.append(Sample(images, text, state, t_ns, ep))
        if not wanted:
            break
    bar.close()
    out.sort(key=lambda r: r.time_ns)
    if not out:
        raise RecordingError(f"{path}: no usable frame (every joint state had non-finite positions)")
    summary = {
        "cameras": sel.cameras,
        "instruction_topic": sel.instruction,
        "state_topic": sel.state,
        "frames": int(usable.size),
        "samples": len(out),
        "seconds": round(float(dur), 2),
        "episodes": int(episodes[-1]) + 1,
    }
    return out, sel, summary


# ---- a synthetic robot recording -------------------------------------------------------------
_SEP = "=" * 80 + "\n"
_HEADER_DEFS = (
    _SEP
    + "MSG: std_msgs/Header\nbuiltin_interfaces/Time stamp\nstring frame_id\n"
    + _SEP
    + "MSG: builtin_interfaces/Time\nint32 sec\nuint32 nanosec\n"
)
MSGDEFS = {
    IMAGE: (
        "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\nuint8 is_bigendian\n"
        "uint32 step\nuint8[] data\n" + _HEADER_DEFS
    ),
    COMPRESSED: "std_msgs/Header header\nstring format\nuint8[] data\n" + _HEADER_DEFS,
    TEXT: "string data\n",
    JOINT_STATE: (
        "std_msgs/Header header\nstring[] name\nfloat64[] position\nfloat64[] velocity\n"
        "float64[] effort\n" + _HEADER_DEFS
    ),
}
URDF_TEXT = (
    '<?xml version="1.0"?>\n<robot name="arm">\n'
    + "".join(
        f'  <link name="link_{i}"><inertial><mass value="1.0"/></inertial></link>\n'
        f'  <joint name="joint_{i}" type="revolute"><parent link="link_{i}"/>'
        f'<child link="link_{i + 1}"/><limit lower="-3.14" upper="3.14" effort="10" '
        'velocity="1"/></joint>\n'
        for i in range(30)
    )
    + "</robot>\n"
)


def write_synthetic_recording(
    path: str | Path,
    seconds: float = 6.0,
    rate_hz: float = 15.0,
    size: tuple[int, int] = (96, 128),
    episodes: int = 2,
    instructions: tuple[str, ...] = ("open the drawer", "push the button"),
    depth: bool = True,
    urdf: bool = True,
    wrist_compressed: bool = True,
    compression: str = "zstd",
    seed: int = 0,
) -> dict:
    """A rosbag2-style .mcap with the topic mix of a real robot recording: /cam_high/image_raw
    (rgb8 Image), /cam_wrist/image_raw/compressed (JPEG; or bgr8 Image), a 16UC1 depth stream,
    the URDF on /robot_description (std_msgs/String, once, first), /instruction (String, at each
    episode start), /joint_states (JointState, 2x the camera rate). Episodes are separated by a
    2 s pause. Returns what was written (frame times, per-frame instruction, topics)."""
    import cv2
    from mcap.writer import CompressionType
    from mcap_ros2.writer import Writer

    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    comp = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}[compression]
    frames = int(round(seconds * rate_hz))
    per_ep = max(1, frames // episodes)
    t0 = 1_700_000_000_000_000_000
    dt = int(1e9 / rate_hz)
    out = {"times_ns": [], "instructions": [], "episodes": [], "topics": {}}

    def hdr(t, frame):
        return {"stamp": {"sec": t // 10**9, "nanosec": t % 10**9}, "frame_id": frame}

    with open(path, "wb") as f:
        wr = Writer(f, compression=comp)
        sch = {k: wr.register_msgdef(k, v) for k, v in MSGDEFS.items()}
        cam_high = "/cam_high/image_raw"
        cam_wrist = "/cam_wrist/image_raw/compressed" if wrist_compressed else "/cam_wrist/image_raw"
        out["topics"] = {
            "cameras": [cam_high, cam_wrist],
            "depth": "/cam_high/depth/image_raw",
            "urdf": "/robot_description",
            "instruction": "/instruction",
            "state": "/joint_states",
        }
        if urdf:
            wr.write_message("/robot_description", sch[TEXT], {"data": URDF_TEXT}, t0 - 10**9, t0 - 10**9)
        t = t0
        for ep in range(episodes):
            text = instructions[ep % len(instructions)]
            wr.write_message("/instruction", sch[TEXT], {"data": text}, t, t)
            count = per_ep if ep < episodes - 1 else frames - per_ep * (episodes - 1)
            for i in range(count):
                phase = (ep * per_ep + i) / max(frames, 1)
                base = (np.stack([xx * (1 + phase), yy, xx + yy * phase], axis=-1) * (200.0 / max(h, w))) % 256
                x0 = int((w - 20) * ((i / max(count, 1) + 0.3 * ep) % 1.0))
                base[h // 3 : h // 3 + 16, x0 : x0 + 16] = (255, 40, 40)
                img = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
                for k in range(2):  # joint states at twice the camera rate
                    tj = t + k * dt // 2
                    wr.write_message(
                        "/joint_states",
                        sch[JOINT_STATE],
                        {
                            "header": hdr(tj, ""),
                            "name": [f"joint_{j}" for j in range(6)],
                            "position": [float(np.sin(phase * 6 + j)) for j in range(6)],
                            "velocity": [],
                            "effort": [],
                        },
                        tj,
                        tj,
                    )
                wr.write_message(
                    cam_high,
                    sch[IMAGE],
                    {
                        "header": hdr(t, "cam_high"),
                        "height": h,
                        "width": w,
                        "encoding": "rgb8",
                        "is_bigendian": 0,
                        "step": 3 * w,
                        "data": img.tobytes(),
                    },
                    t,
                    t,
                )
                wimg = np.ascontiguousarray(img[::-1, ::-1])
                if wrist_compressed:
                    ok, jpg = cv2.imencode(".jpg", wimg[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
                    wr.write_message(
                        cam_wrist,
                        sch[COMPRESSED],
                        {"header": hdr(t + 1000, "cam_wrist"), "format": "jpeg", "data": jpg.tobytes()},
                        t + 1000,
                        t + 1000,
                    )
                else:
                    wr.write_message(
                        cam_wrist,
                        sch[IMAGE],
                        {
                            "header": hdr(t + 1000, "cam_wrist"),
                            "height": h,
                            "width": w,
                            "encoding": "bgr8",
                            "is_bigendian": 0,
                            "step": 3 * w,
                            "data": wimg[..., ::-1].tobytes(),
                        },
                        t + 1000,
                        t + 1000,
                    )
                if depth:
                    d = (1000 + 500 * np.sin(xx / 17 + phase)).astype(np.uint16)
                    wr.write_message(
                        "/cam_high/depth/image_raw",
                        sch[IMAGE],
                        {
                            "header": hdr(t + 2000, "cam_high_depth"),
                            "height": h,
                            "width": w,
                            "encoding": "16UC1",
                            "is_bigendian": 0,
                            "step": 2 * w,
                            "data": d.tobytes(),
                        },
                        t + 2000,
                        t + 2000,
                    )
                out["times_ns"].append(t)
                out["instructions"].append(text)
                out["episodes"].append(ep)
                t += dt
            t += 2 * 10**9  # pause between episodes
        wr.finish()
    return out
