import sys, numpy as np, torch
sys.path.insert(0, "tests")
from conftest import SMALL_CFG, scaled_random_model, random_ink_image
from export.onnx_export import export_encoder
from onnxruntime.quantization import quantize_static, QuantFormat, QuantType, CalibrationMethod, CalibrationDataReader
from export.quantize import calibration_batches, ImageCalibrationReader
model = scaled_random_model(SMALL_CFG, seed=3)
export_encoder(model, "/tmp/q8/enc.onnx")
gen = torch.Generator().manual_seed(7)
calib = [random_ink_image(h, w, gen)[0, 0].numpy() for h, w in ((40, 100), (94, 256), (60, 180), (33, 70))]
class R(ImageCalibrationReader, CalibrationDataReader): pass
for rr in (False, True):
    quantize_static("/tmp/q8/enc.onnx", f"/tmp/q8/enc_rr{int(rr)}.onnx", R(calibration_batches(calib)), quant_format=QuantFormat.QDQ,
        per_channel=True, reduce_range=rr, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibTensorRangeSymmetric": True})
x = random_ink_image(94, 256, torch.Generator().manual_seed(8))
np.save("/tmp/q8/x.npy", x.numpy())
with torch.no_grad(): np.save("/tmp/q8/ref.npy", model.encoder(x).numpy())
