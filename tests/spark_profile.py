"""The product's Spark profiles (conf/spark/*.conf), read so the test session runs with their settings."""

import re

from tests.data_paths import REPO

PROFILES = REPO / "conf" / "spark"
ARROW = "spark.sql.execution.arrow."


def read_profile(name: str) -> dict[str, str]:
    """A profile's properties, as spark-submit --properties-file reads them: `key value` (or
    `key=value`) lines, `#` comments."""
    settings = {}
    for line in (PROFILES / f"{name}.conf").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            key, value = re.match(r"([^\s=:]+)\s*[\s=:]\s*(.*)", line).groups()
            settings[key] = value.strip()
    return settings


def arrow_settings(name: str = "local") -> dict[str, str]:
    """The profile's spark.sql.execution.arrow.* settings (how pandas data crosses to and from the JVM)."""
    return {k: v for k, v in read_profile(name).items() if k.startswith(ARROW)}
