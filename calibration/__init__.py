"""Sources of real inputs (image folders, .npy/.npz, the built-in sample set) and adapters to
ONNX Runtime's CalibrationDataReader and Polygraphy's Calibrator."""
