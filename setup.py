"""ament_python package: the library (quantvla_core), the kernels (kernels/ installed as
quantvla_kernels), the ROS 2 nodes (quantvla_ros), launch files and parameter YAML."""

from glob import glob

from setuptools import setup

package_name = "quantvla_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=[
        "quantvla_core",
        "quantvla_core.models",
        "quantvla_core.quant",
        "quantvla_core.sim",
        "quantvla_core.loaders",
        "quantvla_kernels",
        "quantvla_ros",
    ],
    package_dir={"quantvla_kernels": "kernels"},
    package_data={"quantvla_core": ["assets/*", "assets/**/*"], "quantvla_kernels": ["*.cpp"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml") + glob("config/*.xml")),
    ],
    install_requires=["setuptools"],
    zip_safe=False,  # the fused CPU kernel's C++ source is compiled from the installed file
    maintainer="quantvla developers",
    maintainer_email="quantvla@example.com",
    description="Quantized VLA policies served as ROS 2 nodes.",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "quantvla = quantvla_core.cli:main",
            "policy_node = quantvla_ros.policy_node:main",
            "synthetic_camera = quantvla_ros.synthetic_camera:main",
            "sim_bridge = quantvla_ros.sim_bridge:main",
        ],
    },
)
