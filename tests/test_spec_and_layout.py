"""Model specs (presets and detection) and the target layout's arithmetic and checks."""

import dataclasses
import json
import math
import os

import pytest

from reshard import config
from reshard.errors import ConfigError, LayoutError, SourceError, UnsupportedError
from reshard.layout import Layout
from reshard.models import table_for
from reshard.spec import ModelSpec, check_preset, read_hf_config, spec_from_hf_config, to_hf_config
from reshard.synthetic import canonical_shapes, load_preset

from conftest import FAMILIES, REPO

# Published parameter counts: the presets must reproduce them exactly.
PARAMS = {
    "llama2_7b": 6_738_415_616, "llama2_13b": 13_015_864_320, "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496, "llama3.1_8b": 8_030_261_248,
    "llama3.1_70b": 70_553_706_496, "llama3.1_405b": 405_853_388_800, "mistral_7b": 7_241_732_096,
    "qwen2_0.5b": 494_032_768, "qwen2_7b": 7_615_616_512, "qwen2_72b": 72_706_203_648,
    "mixtral_8x7b": 46_702_792_704, "mixtral_8x22b": 140_620_634_112,
    # the model card says 57.4B; this is the sum of its published module shapes
    "qwen2_moe_57b_a14b": 57_408_658_944,
    # Qwen3: the safetensors total of Qwen3-8B; the others match their model cards' figures (total and
    # non-embedding: 0.6B/0.44B, 1.7B/1.4B, 4.0B/3.6B, 14.8B/13.2B, 32.8B/31.2B, 30.5B, 235B)
    "qwen3_0.6b": 596_049_920, "qwen3_1.7b": 1_720_574_976, "qwen3_4b": 4_022_468_096,
    "qwen3_8b": 8_190_735_360, "qwen3_14b": 14_768_307_200, "qwen3_32b": 32_762_123_264,
    "qwen3_30b_a3b": 30_532_122_624, "qwen3_235b_a22b": 235_093_634_560,
    # DeepSeek-V3's main model (its card: 671B, plus a 14B multi-token-prediction module not counted here);
    # Moonlight-16B-A3B: its card's 16B total
    "deepseek_v3": 671_026_419_200, "moonlight_16b_a3b": 15_960_110_208,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_real_presets_have_the_published_parameter_count(name):
    spec = load_preset(name)
    assert sum(math.prod(s) for s in canonical_shapes(spec).values()) == PARAMS[name]


def test_every_preset_file_composes_through_hydra_into_a_valid_spec():
    from reshard.run import preset_spec

    names = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "conf", "model")) if f.endswith(".yaml"))
    assert len(names) >= 21
    for name in names:
        cfg = config.compose([f"+model={name}"])
        spec = preset_spec(cfg.model)
        assert spec.name == name and spec == load_preset(name)


def test_llama31_preset_carries_llama3_rope_scaling():
    s = load_preset("llama3.1_8b")
    assert s.rope_theta == 500000.0 and dict(s.rope_scaling)["rope_type"] == "llama3"
    assert dict(s.rope_scaling)["factor"] == 8.0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_detected_spec_of_a_transformers_checkpoint_equals_its_preset(hf_models, family):
    detected = read_hf_config(hf_models[family])
    preset = load_preset(FAMILIES[family])
    assert check_preset(preset, detected, "x") == dataclasses.replace(detected, name=preset.name)
    assert detected.num_query_groups == preset.num_query_groups
    assert detected.tie_word_embeddings == preset.tie_word_embeddings
    assert detected.qkv_bias == preset.qkv_bias


def test_hf_config_round_trips_through_to_hf_config():
    for name in ("llama3.1_405b", "qwen2_0.5b", "mistral_7b", "llama2_70b"):
        spec = load_preset(name)
        back = spec_from_hf_config(json.loads(json.dumps(to_hf_config(spec))))
        assert dataclasses.replace(back, name=name) == spec


def test_a_disagreeing_preset_names_every_differing_field():
    a = load_preset("tiny_llama3")
    b = dataclasses.replace(a, num_layers=8, hidden_size=128, rope_theta=10000.0, name="other")
    with pytest.raises(ConfigError) as e:
        check_preset(b, a, "/ckpt")
    msg = str(e.value)
    for field in ("num_layers", "hidden_size", "rope_theta"):
        assert field in msg
    assert "num_attention_heads" not in msg


def test_unsupported_model_type_is_named():
    with pytest.raises(UnsupportedError, match="gpt2"):
        spec_from_hf_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_config_json_missing_a_required_field_is_named():
    cfg = to_hf_config(load_preset("tiny_llama2"))
    del cfg["intermediate_size"]
    with pytest.raises(SourceError, match="intermediate_size"):
        spec_from_hf_config(cfg)


def test_spec_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(ConfigError, match="hiden_size"):
        ModelSpec.from_dict({**load_preset("tiny_llama2").to_dict(), "hiden_size": 3})
    d = load_preset("tiny_llama2").to_dict()
    del d["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelSpec.from_dict(d)


@pytest.mark.parametrize("vocab,tp,m,padded", [(32000, 1, 128, 32000), (32000, 8, 128, 32768),
                                               (128256, 8, 128, 129024), (151936, 1, 128, 151936),
                                               (151936, 4, 128, 152064),
                                               (250, 4, 128, 512), (50257, 2, 64, 50304)])
def test_padded_vocab_follows_megatron(vocab, tp, m, padded):
    assert Layout(tp=tp, make_vocab_size_divisible_by=m).padded_vocab(vocab) == padded


def test_stage_layers_even_virtual_and_uneven():
    assert Layout(pp=2).stage_layers(8) == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    # FORMATS.md: 8 layers, pp=2, vp=2 -> stage 0 holds [0,1] and [4,5]
    assert Layout(pp=2, vpp=2).stage_layers(8) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    assert Layout(pp=3, first_stage_layers=2, last_stage_layers=2).stage_layers(8) == [
        [[0, 1]], [[2, 3, 4, 5]], [[6, 7]]]
    all_layers = sorted(i for st in Layout(pp=4, vpp=2).stage_layers(16) for ch in st for i in ch)
    assert all_layers == list(range(16))


def _spec(**kw):
    return dataclasses.replace(load_preset("tiny_llama2"), **kw)


@pytest.mark.parametrize("kw,layout,needle", [
    ({}, Layout(tp=3), "num_attention_heads=4 is not divisible by tp=3"),
    ({"num_attention_heads": 12, "num_query_groups": 3}, Layout(tp=2), "num_query_groups=3"),
    ({"ffn_hidden_size": 130}, Layout(tp=4), "ffn_hidden_size=130"),
    ({}, Layout(pp=3), "num_layers=4 is not divisible by pp=3"),
    ({}, Layout(pp=2, vpp=4), "pp*vpp=2*4"),
    ({}, Layout(pp=2, first_stage_layers=5), "does not split evenly"),
    ({}, Layout(tp=0), "target_tp=0"),
])
def test_layouts_that_do_not_divide_are_rejected_with_the_reason(kw, layout, needle):
    spec = _spec(**kw)
    assert any(needle in p for p in layout.problems(spec)), layout.problems(spec)
    with pytest.raises(LayoutError, match="does not fit"):
        layout.check(spec)


def test_fewer_kv_heads_than_tp_is_allowed_when_it_divides_as_megatron_allows():
    spec = _spec(num_attention_heads=8, num_query_groups=2)
    assert Layout(tp=4).problems(spec) == []
    assert Layout(tp=8).problems(_spec(num_attention_heads=8, num_query_groups=1, ffn_hidden_size=176)) == []


def test_mapping_table_validates_itself_and_covers_every_canonical_tensor():
    from reshard.mapping import MappingTable, Replicated

    spec = load_preset("tiny_qwen2")
    names = table_for(spec).canonical_names(spec)
    assert "lm_head.weight" not in names  # tied
    assert "model.layers.3.self_attn.k_proj.bias" in names
    assert len(names) == 2 + 4 * 12
    with pytest.raises(AssertionError, match="placeholders"):
        MappingTable("bad", top=(Replicated(mcore="x", hf="model.layers.{i}.x", dims=("hidden",)),), layer=())
    with pytest.raises(AssertionError, match="mapped twice"):
        MappingTable("bad", top=(), layer=(Replicated(mcore="a", hf="l.{i}.x", dims=("hidden",)),
                                           Replicated(mcore="b", hf="l.{i}.x", dims=("hidden",))))
    t = table_for(spec)
    assert t.is_dropped("model.layers.7.self_attn.rotary_emb.inv_freq")
    assert not t.is_dropped("model.layers.7.self_attn.q_proj.weight")
