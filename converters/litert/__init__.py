"""LiteRT plumbing shared by the tflite and mtk targets: graphs, building, calibration, the runtime."""
