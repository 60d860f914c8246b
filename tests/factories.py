"""Small real networks with random weights, saved as edm-deploy checkpoints, for tests."""

from __future__ import annotations

TINY_CONFIGS = {
    # DDPM++-style: positional embedding, standard encoder, [1,1] resampling, attention at 4x4.
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], dropout=0.0),
    # NCSN++-style: Fourier embedding, residual encoder (fused aux_residual), [1,3,3,1] filters.
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], dropout=0.0),
    # ADM: DhariwalUNet with attention at 4x4 and adaptive scale.
    "adm": dict(model_type="DhariwalUNet", model_channels=32, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[4], dropout=0.0),
}


def tiny_network(arch: str = "ddpmpp", precond: str = "EDMPrecond", label_dim: int = 10, resolution: int = 8,
                 channels: int = 1, seed: int = 0, **overrides):
    """(net, network description) with random (non-zero) weights so outputs depend on every layer."""
    import torch

    from edm_deploy.training.checkpoint import build_network

    kwargs = dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim, use_fp16=False,
                  **TINY_CONFIGS[arch])
    kwargs.update(overrides)
    network = {"class_name": precond, "init_kwargs": kwargs}
    torch.manual_seed(seed)
    net = build_network(network)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn_like(p) / max(fan_in, 1) ** 0.5)
    return net.eval(), network


def tiny_checkpoint(path: str, arch: str = "ddpmpp", **kwargs) -> str:
    from edm_deploy.training.checkpoint import save_checkpoint

    net, network = tiny_network(arch, **kwargs)
    save_checkpoint(str(path), network, net.state_dict(), meta={"note": "random weights for tests"})
    return str(path)


def save_as_exported(model, path: str) -> str:
    """Save an ONNX export a test edited as if it had been exported that way (its manifest's content
    digest renewed): the test plants a wrong export, not a damaged file."""
    import json

    import onnx

    from edm_deploy.export.onnx_export import embed_manifest
    from edm_deploy.runtime.core.manifest import ONNX_METADATA_KEY

    manifest = json.loads(next(p.value for p in model.metadata_props if p.key == ONNX_METADATA_KEY))
    embed_manifest(model, manifest)
    onnx.save(model, path)
    return path
