"""On CI every outside tool the suite uses must be there: the other tests skip when one is
missing (so a developer without Orthanc can still run the rest), and this test makes sure CI
never passes by skipping them."""

import os
import shutil

import pytest

from dicomnode.testing.orthanc import orthanc_binary

TOOLS = [
    "storescu",
    "echoscu",
    "storescp",
    "dcmcjpeg",
    "dcmcjpls",
    "dcmcrle",
    "dciodvfy",
    "systemd-analyze",
    "systemd-sysusers",
]


@pytest.mark.skipif(not os.environ.get("CI"), reason="outside CI a missing tool only skips the tests that need it")
def test_ci_has_every_tool():
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if orthanc_binary() is None:
        missing.append("Orthanc")
    assert missing == [], f"make test should have installed: {missing}"
