"""Image files to gray pixels: decoding (PNG/JPEG/TIFF/BMP), DICOM, and each model's input geometry."""
