from setuptools import find_packages, setup

setup(
    name="cxr-features",
    version="0.1.0",
    description="Distributed feature extraction and head training for chest X-ray diagnosis",
    python_requires=">=3.11",
    packages=find_packages(include=["common", "common.*", "jobs", "jobs.*", "heads", "heads.*", "finetune", "finetune.*",
                                    "cxr", "cxr.*", "lungs", "lungs.*", "serve", "serve.*"]),
    # The shipped lung model travels with the package (lungs.model.load_lung_model("default")).
    package_data={"lungs": ["models/*.pt", "models/*.json"], "serve": ["static/*"]},
    # `cxr extract|finetune|train|predict|report ...`, also `python -m cxr`.
    entry_points={"console_scripts": ["cxr=cxr.cli:main"]},
    install_requires=[
        # torch/torchvision are pinned to the releases this project is built and tested against.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "pyspark==4.3.0",
        # PySpark 4.3 does not yet fully support pandas 3.
        "pandas>=2.2,<3",
        "pyarrow>=16,<27",
        "numpy>=1.26,<3",
        "scikit-learn>=1.5,<2",
        "pillow>=10,<14",
        # PNG decoding (common/images/decode.py): OpenCV's libpng gives Pillow's pixels ~10% faster (bench/decoders.py).
        "opencv-python-headless>=5.1,<6",
        "matplotlib>=3.8,<4",
        "scipy>=1.11,<2",
        # DICOM (common/images/dicom.py): pydicom 3's pixels API (pixel_array, apply_voi_lut, set_pixel_data).
        "pydicom>=3.0.2,<3.1",
        # Its pixel-data plugins for compressed transfer syntaxes. libjpeg: JPEG lossless (the usual
        # CR/DX syntax), 12-bit JPEG extended and JPEG-LS, which neither pydicom nor Pillow decodes;
        # openjpeg: HTJ2K (Pillow cannot), and it encodes the tests' JPEG 2000 files; rle: RLE
        # Lossless 13x faster than pydicom's own decoder (bench/dicom_decode.py).
        "pylibjpeg>=2.1,<3",
        "pylibjpeg-libjpeg>=2.5,<3",
        "pylibjpeg-openjpeg>=2.6,<3",
        "pylibjpeg-rle>=2.2,<3",
        # Backbones torchvision lacks: timm's Xception (create_model + pretrained_cfg), and torchxrayvision's
        # chest-X-ray-trained DenseNet-121; each keeps its own weights file and cache place.
        "timm>=1.0.31,<1.1",
        "torchxrayvision>=1.5.7,<1.6",
        # The diagnosis service (serve/): Flask for the page and API, waitress to serve it with threads
        # (pure Python, production-grade, no compiler or system library).
        "flask>=3.1,<3.2",
        "waitress>=3.0.2,<4",
    ],
    # playwright drives Debian's chromium in the browser test (no browser download: executable_path); moto's
    # standalone server is the S3 endpoint of the object-storage test (tests/test_object_store.py).
    extras_require={"test": ["pytest>=8,<10", "playwright>=1.58,<2", "moto[server]>=5.1,<6"]},
)
