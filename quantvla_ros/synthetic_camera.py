"""`synthetic_camera`: rendered table-top scenes, an instruction and joint states, for demos
and tests without a robot.

Each camera topic shows the same scene (a table, a red and a blue block moving on slow circles,
a green target) from a slightly different colour/offset, all frames of one tick carrying the
same stamp so the policy node's stamp matching pairs them. The instruction is latched
(RELIABLE + TRANSIENT_LOCAL); joint states follow slow sines.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import JointState
from std_msgs.msg import String

from quantvla_ros.image_conversion import RAW_ENCODINGS, rgb_to_compressed, rgb_to_image


def render_scene(width: int, height: int, t: float, view: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 RGB scene at time t seconds, seen from camera `view`."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), np.uint8)
    img[:, :, 0] = (150 + 60 * y + 10 * view).clip(0, 255)  # wooden table, brighter near camera
    img[:, :, 1] = (110 + 40 * y + 5 * x).clip(0, 255)
    img[:, :, 2] = (70 + 20 * y).clip(0, 255)
    s = min(width, height)
    cx, cy = width / 2 + view * 0.05 * width, height / 2
    target = (int(cx + 0.3 * s * math.cos(0.2)), int(cy - 0.25 * s))
    cv2.circle(img, target, max(2, s // 14), (40, 180, 60), -1)
    for color, phase, radius in (((220, 40, 40), 0.0, 0.22), ((40, 70, 220), 2.1, 0.3)):
        bx = int(cx + radius * s * math.cos(0.5 * t + phase))
        by = int(cy + 0.6 * radius * s * math.sin(0.5 * t + phase))
        half = max(1, s // 16)
        cv2.rectangle(img, (bx - half, by - half), (bx + half, by + half), color, -1)
    return img


class SyntheticCamera(Node):
    def __init__(self, **kwargs):
        super().__init__("synthetic_camera", **kwargs)
        p = self.declare_parameter
        self._topics = list(p("camera_topics", ["camera/image_raw"]).value)
        self._format = p("compressed_format", "jpeg").value  # for topics ending in /compressed
        self._encoding = p("encoding", "rgb8").value
        self._width = p("width", 640).value
        self._height = p("height", 480).value
        rate = p("rate_hz", 30.0).value
        self._frame_id = p("frame_id", "camera").value
        instruction = p("instruction", "pick up the red block and place it on the green target").value
        self._joint_names = list(p("joint_names", ["joint_0", "joint_1", "joint_2", "joint_3"]).value)
        joint_topic = p("joint_state_topic", "joint_states").value
        if self._encoding not in RAW_ENCODINGS:
            raise ValueError(f"encoding {self._encoding!r} is not supported; accepted: {', '.join(RAW_ENCODINGS)}")
        if self._width <= 0 or self._height <= 0 or rate <= 0:
            raise ValueError("width, height and rate_hz must be > 0")
        from sensor_msgs.msg import CompressedImage, Image

        self._pubs = []
        for topic in self._topics:
            compressed = topic.rstrip("/").endswith("/compressed")
            self._pubs.append(
                (
                    compressed,
                    self.create_publisher(CompressedImage if compressed else Image, topic, qos_profile_sensor_data),
                )
            )
        latched = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=1,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        self._instruction_pub = self.create_publisher(String, p("instruction_topic", "instruction").value, latched)
        self._instruction_pub.publish(String(data=instruction))
        self._joint_pub = (
            self.create_publisher(JointState, joint_topic, qos_profile_sensor_data) if joint_topic else None
        )
        self._t0 = self.get_clock().now()
        self.frames_published = 0
        self._timer = self.create_timer(1.0 / rate, self._tick)
        self.get_logger().info(
            f"publishing {self._width}x{self._height} {self._encoding} at "
            f"{rate} Hz on {self._topics}; instruction {instruction!r}"
        )

    def _tick(self) -> None:
        now = self.get_clock().now()
        t = (now - self._t0).nanoseconds * 1e-9
        stamp = now.to_msg()
        for view, (compressed, pub) in enumerate(self._pubs):
            rgb = render_scene(self._width, self._height, t, view)
            msg = rgb_to_compressed(rgb, self._format) if compressed else rgb_to_image(rgb, self._encoding)
            msg.header.stamp = stamp
            msg.header.frame_id = f"{self._frame_id}{view}"
            pub.publish(msg)
        if self._joint_pub is not None:
            js = JointState()
            js.header.stamp = stamp
            js.name = self._joint_names
            js.position = [0.3 * math.sin(0.4 * t + i) for i in range(len(self._joint_names))]
            self._joint_pub.publish(js)
        self.frames_published += 1


def main(args=None) -> int:
    rclpy.init(args=args)
    node = SyntheticCamera()
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
