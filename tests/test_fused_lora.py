"""kiln.fused_lora computes what PEFT's LoRA layers compute (issue 28): forward and every gradient,
on real layers of tiny models with a 4-bit NF4 base (float32 compute, as CPU QLoRA runs), for the
Qwen2 layout (q/k/v biases, grouped K/V heads) and the Llama layout (no biases)."""

from __future__ import annotations

import functools

import pytest
import torch

from kiln import fused_lora

TOL = dict(rtol=1e-4, atol=1e-5)  # float32: only the order of additions differs


def _tiny(tmp_path, model_type: str, quantized: bool = True):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from kiln.backends import bnb_config

    cfg = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / model_type)
    q = {"quantization_config": bnb_config(torch.float32)} if quantized else {}  # else quantization: none
    base = AutoModelForCausalLM.from_pretrained(tmp_path / model_type, dtype=torch.float32, **q)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, lora)
    model.train()  # as in training (in eval mode with no grad, bitsandbytes runs a bf16 CPU kernel instead)
    return model


@pytest.fixture(scope="module", params=["qwen2", "llama", "llama-16bit-base"])
def model(request, tmp_path_factory):
    """The Qwen2 and Llama layouts on an NF4 base, and Llama on an unquantized base (quantization: none)."""
    return _tiny(tmp_path_factory.mktemp("fused"), request.param.split("-")[0], "16bit" not in request.param)


def _lora_params(projs):
    return [p for proj in projs for p in (proj.lora_A["default"].weight, proj.lora_B["default"].weight)]


def _run(fn, X, params, upstream):
    for p in params:
        p.grad = None
    x = X.clone().requires_grad_(True)
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum((o * u).sum() for o, u in zip(outs, upstream)).backward()
    return [o.detach() for o in outs], x.grad, [p.grad.clone() for p in params]


def _same(fused, plain):
    (fo, fx, fp), (po, px, pp) = fused, plain
    for a, b in zip(fo, po):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(fx, px, **TOL)
    assert len(fp) == len(pp)
    for a, b in zip(fp, pp):
        torch.testing.assert_close(a, b, **TOL)


def _upstream(*shapes):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*s, generator=g) for s in shapes]


def test_the_tiny_layers_are_what_the_fused_path_takes(model):
    layer = fused_lora.decoder_layers(model)[0]
    quantized = getattr(model.config, "quantization_config", None) is not None
    assert (layer.self_attn.q_proj.get_base_layer().weight.__class__.__name__ == "Params4bit") == quantized
    for proj in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert fused_lora.plain_lora(proj) == "default"
    has_bias = layer.self_attn.q_proj.get_base_layer().bias is not None
    assert has_bias == (model.config.model_type == "qwen2")  # the case Unsloth leaves unfused


def test_fused_qkv_equals_peft_q_k_v_forward_and_gradients(model):
    for layer in fused_lora.decoder_layers(model):
        a = layer.self_attn
        projs = (a.q_proj, a.k_proj, a.v_proj)
        X = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(2))
        up = _upstream(*[(3, 11, p.get_base_layer().out_features) for p in projs])
        params = _lora_params(projs)
        for cat in (True, False):  # both ways of forming the input-gradient
            fused = _run(functools.partial(fused_lora.fused_projections, projs, cat_input_grad=cat), X, params, up)
            plain = _run(lambda x, projs=projs: tuple(p(x) for p in projs), X, params, up)
            _same(fused, plain)
            assert all(g.abs().sum() > 0 for g in fused[2])  # every A and B got a gradient


def test_fused_o_projection_equals_peft(model):
    o = fused_lora.decoder_layers(model)[1].self_attn.o_proj
    X = torch.randn(2, 7, o.get_base_layer().in_features, generator=torch.Generator().manual_seed(3))
    up = _upstream((2, 7, 64))
    params = _lora_params([o])
    _same(_run(lambda x: fused_lora.fused_projections((o,), x), X, params, up), _run(o, X, params, up))


def test_fused_mlp_equals_peft_mlp_forward_and_gradients(model):
    for layer in fused_lora.decoder_layers(model):
        mlp = layer.mlp
        X = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4))
        up = _upstream((2, 9, 64))
        params = _lora_params([mlp.gate_proj, mlp.up_proj, mlp.down_proj])
        fused = _run(functools.partial(fused_lora.fused_mlp, mlp), X, params, up)
        plain = _run(mlp.forward, X, params, up)
        _same(fused, plain)


def test_a_whole_models_loss_and_gradients_with_the_fused_mlps(model, monkeypatch):
    """The model's own loss through every layer, its MLPs fused (the attention of a transformers model
    has no apply_qkv hook: install says so and leaves it), against the unfused model."""
    import types

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    params = [p for n, p in model.named_parameters() if "lora_" in n]

    def loss_and_grads():
        for p in params:
            p.grad = None
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in params]

    plain_loss, plain_grads = loss_and_grads()
    layers = fused_lora.decoder_layers(model)
    for layer in layers:
        monkeypatch.setattr(layer.mlp, "forward", types.MethodType(fused_lora._mlp_forward, layer.mlp))
    fused_loss, fused_grads = loss_and_grads()
    torch.testing.assert_close(fused_loss, plain_loss, **TOL)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, **TOL)


def test_install_fuses_what_it_can_and_says_what_it_left(model, monkeypatch):
    layers = fused_lora.decoder_layers(model)
    for layer in layers:  # Unsloth's hooks, as its patched attention carries them
        monkeypatch.setattr(layer.self_attn, "apply_qkv", None, raising=False)
        monkeypatch.setattr(layer.self_attn, "apply_o", None, raising=False)
        monkeypatch.setattr(layer.mlp, "forward", layer.mlp.forward)
    done = fused_lora.install(model)
    assert done == {"qkv": 2, "o": 2, "mlp": 2, "layers": 2, "left": []}
    assert layers[0].self_attn.apply_qkv is fused_lora._apply_qkv
    X = torch.randn(1, 5, 64)
    q, k, v = layers[0].self_attn.apply_qkv(layers[0].self_attn, X)
    torch.testing.assert_close(q, layers[0].self_attn.q_proj(X), **TOL)


def test_a_cpu_layer_repacked_by_bitsandbytes_still_dequantizes_to_its_weight(tmp_path):
    """In eval mode with an input that needs no gradient, bitsandbytes repacks a CPU layer's 4-bit
        weight for its own kernel (its block scales rounded to bfloat16); the fused path must read that
    weight back in the standard layout."""
    m = _tiny(tmp_path, "llama")
    q = fused_lora.decoder_layers(m)[0].self_attn.q_proj
    w = q.get_base_layer().weight
    before = torch.empty(w.quant_state.shape)
    fused_lora._dequantize_into(w, before)
    m.eval()
    with torch.no_grad():
        q(torch.randn(1, 3, 64))
    after = torch.empty_like(before)
    fused_lora._dequantize_into(q.get_base_layer().weight, after)
    # bitsandbytes' repacking rounds each block's scale to bfloat16, and the weight comes out in bfloat16: 2^-7
    torch.testing.assert_close(after, before, rtol=2**-7, atol=0)
    assert not torch.equal(after, torch.zeros_like(after))


def test_install_leaves_layers_it_cannot_compute_exactly(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    dropout = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1)
    m = get_peft_model(AutoModelForCausalLM.from_config(cfg), dropout)
    assert fused_lora.plain_lora(fused_lora.decoder_layers(m)[0].self_attn.q_proj) is None  # dropout: PEFT's own
    assert fused_lora.install(m) == {"qkv": 0, "o": 0, "mlp": 0, "layers": 1, "left": []}
    m2 = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=4, target_modules="all-linear"))
    done = fused_lora.install(m2)  # plain LoRA, but a transformers attention: no hook to put q/k/v on
    assert done["qkv"] == 0 and done["mlp"] == 1
    assert done["left"] == ["layer 0: attention has no apply_qkv hook (not an Unsloth model)"]


def test_lora_gemms_resolves_with_its_reason(monkeypatch):
    """training.lora_gemms: separate always runs; auto says why it keeps the backend's own; fused where
    it can't run fails at once naming what to change."""
    from kiln import backends

    resolve = backends.resolve_lora_gemms
    assert resolve("separate", "unsloth", 0.0) == ("separate", "training.lora_gemms: separate")
    assert resolve("fused", "unsloth", 0.0) == ("fused", "training.lora_gemms: fused")
    gemms, why = resolve("auto", "hf", 0.0)
    assert gemms == "separate" and "the backend is hf" in why
    with pytest.raises(ValueError, match=r"lora_gemms: fused can't run here: .*lora_dropout > 0.*set auto or separate"):
        resolve("fused", "unsloth", 0.1)
    for measured in (False, True):
        monkeypatch.setattr(backends, "AUTO_FUSED", measured)
        assert resolve("auto", "unsloth", 0.0)[0] == ("fused" if measured else "separate")


def test_lora_gemms_fused_with_the_hf_backend_is_refused_when_the_config_is_read():
    from kiln.spec import SpecError, TrainingSettings

    with pytest.raises(SpecError, match=r"experiments.x.training.lora_gemms: fused can't run with backend: hf"):
        TrainingSettings(backend="hf", lora_gemms="fused").check("experiments.x.training")
    TrainingSettings(backend="auto", lora_gemms="fused").check()  # auto may be Unsloth: decided at run time
