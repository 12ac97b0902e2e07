"""Serving CapHuman-RT with NVIDIA Triton Inference Server (docs/serving.md).

model_repository/  the Triton model repository: caphuman (orchestrator), identity, head_condition
params.py          the request and response fields, limits (the one place)
services.py        what the identity and head models compute (no Triton needed)
weights.py         which networks each model loads (official files or tiny random ones)
backend.py         helpers shared by the Python-backend models
launcher.py        start/stop tritonserver (the nvidia-pytriton wheel's binary or the NGC container's)
client.py          the Python gRPC client
"""
