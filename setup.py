"""Packaging beyond what pyproject.toml can say: the bundled model travels with the code.

The repository keeps the bundled checkpoint at `models/kiln-shapes` (its own folder, next to the
code); an installed Kiln finds it at `kiln/bundled/kiln-shapes` (kiln/default_model.py looks in
both). Everything else is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

# Namespace discovery also lists the data folders (export/architectures/sd15/unet, ...) as
# packages, which is how setuptools wants package data below a package to be declared.
CODE = ["engine", "engine.*", "export", "export.*", "server", "server.*", "kiln", "kiln.*"]

setup(
    packages=find_namespace_packages(include=CODE, exclude=["*.__pycache__"]) + ["kiln.bundled"],
    package_dir={"kiln.bundled": "models"},
    package_data={
        "kiln.bundled": ["kiln-shapes/*", "kiln-shapes/*/*"],
        # Offline export: the published architectures' configs and CLIP's BPE vocabulary.
        "export.architectures": ["*/*/*.json"],
        "export.assets": ["*/*"],
        "engine.worker": ["*.proto"],
        "server.playground": ["*.html", "*.js", "*.css", "*.svg"],  # the browser page at / (static files)
    },
)
