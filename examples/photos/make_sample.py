"""Regenerate examples/photos/: eight photographs from Debian's mate-backgrounds package (GPL-2+,
https://git.mate-desktop.org/mate-backgrounds/; see /usr/share/doc/mate-backgrounds/copyright),
shrunk to 512 pixels on the longer side and saved as JPEG quality 90, small enough to ship.

    apt-get install mate-backgrounds && python examples/photos/make_sample.py
"""
from pathlib import Path

from PIL import Image

SOURCE = Path("/usr/share/backgrounds/mate/nature")
NAMES = ["Aqua", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "Storm", "YellowFlower"]

if __name__ == "__main__":
    out = Path(__file__).parent
    for name in NAMES:
        img = Image.open(SOURCE / f"{name}.jpg").convert("RGB")
        img.thumbnail((512, 512), Image.Resampling.LANCZOS)
        img.save(out / f"{name.lower()}.jpg", quality=90)
        print(name, img.size)
