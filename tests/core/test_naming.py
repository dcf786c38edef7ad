"""Canonical names: every LoRA key style maps to the same diffusers module path."""

from __future__ import annotations

import pytest

from mole_core.naming import canonical_from_prefix, execution_key, ldm_to_diffusers_unet, scope_of, split_kohya

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
PREFIXES = [
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", f"unet:{ATTN}"),
    ("lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", f"unet:{ATTN}"),
    (f"unet.{ATTN}", f"unet:{ATTN}"),
    (f"base_model.model.{ATTN}", f"unet:{ATTN}"),
    (ATTN, f"unet:{ATTN}"),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora", f"unet:{ATTN}"),
    ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k", f"unet:{ATTN}"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", f"unet:{ATTN}"),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0",
     "unet:down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0"),
    ("unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.processor.to_out_lora",
     "unet:up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0"),
    ("lora_unet_mid_block_attentions_0_proj_in", "unet:mid_block.attentions.0.proj_in"),
    ("diffusion_model.middle_block.1.proj_in", "unet:mid_block.attentions.0.proj_in"),
    ("lora_unet_down_blocks_0_resnets_1_conv1", "unet:down_blocks.0.resnets.1.conv1"),
    ("diffusion_model.input_blocks.2.0.in_layers.2", "unet:down_blocks.0.resnets.1.conv1"),
    ("diffusion_model.input_blocks.2.0.emb_layers.1", "unet:down_blocks.0.resnets.1.time_emb_proj"),
    ("diffusion_model.input_blocks.3.0.op", "unet:down_blocks.0.downsamplers.0.conv"),
    ("diffusion_model.output_blocks.2.1.conv", "unet:up_blocks.0.upsamplers.0.conv"),
    ("diffusion_model.output_blocks.5.2.conv", "unet:up_blocks.1.upsamplers.0.conv"),
    ("diffusion_model.output_blocks.4.0.skip_connection", "unet:up_blocks.1.resnets.1.conv_shortcut"),
    ("diffusion_model.middle_block.2.out_layers.3", "unet:mid_block.resnets.1.conv2"),
    ("diffusion_model.time_embed.0", "unet:time_embedding.linear_1"),
    ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_ff_net_0_proj",
     "unet:down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj"),
    ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", "unet:down_blocks.0.resnets.0.time_emb_proj"),
]
TE = "text_model.encoder.layers.3.self_attn.q_proj"
TE_PREFIXES = [
    ("lora_te_text_model_encoder_layers_3_self_attn_q_proj", f"te:{TE}"),
    ("lora_te1_text_model_encoder_layers_3_self_attn_q_proj", f"te:{TE}"),
    ("lora_te2_text_model_encoder_layers_3_self_attn_q_proj", f"te2:{TE}"),
    (f"text_encoder.{TE}", f"te:{TE}"),
    ("text_encoder.encoder.layers.3.self_attn.q_proj", f"te:{TE}"),  # transformers-5 layout
    ("text_encoder.text_model.encoder.layers.3.self_attn.to_q_lora", f"te:{TE}"),  # old processor layout
    (f"text_encoder_2.{TE}", f"te2:{TE}"),
    (f"base_model.model.{TE}", f"te:{TE}"),
    ("base_model.model.encoder.layers.3.self_attn.q_proj", f"te:{TE}"),
    ("text_encoders.clip_l.transformer.text_model.encoder.layers.3.self_attn.q_proj", f"te:{TE}"),
    ("text_encoders.clip_g.transformer.text_model.encoder.layers.3.self_attn.q_proj", f"te2:{TE}"),
    ("lora_te_text_model_encoder_layers_11_mlp_fc2", "te:text_model.encoder.layers.11.mlp.fc2"),
]


@pytest.mark.parametrize("prefix,want", PREFIXES + TE_PREFIXES)
def test_every_key_style_maps_to_canonical(prefix, want):
    assert canonical_from_prefix(prefix) == want


def test_peft_component_hint():
    assert canonical_from_prefix("base_model.model.encoder.layers.0.mlp.fc1", "te2") == \
        "te2:text_model.encoder.layers.0.mlp.fc1"


@pytest.mark.parametrize("prefix", ["lora_unet_double_blocks_0_img_attn_qkv", "transformer.blocks.0.attn",
                                    "model.layers.0.self_attn.q_proj.weight_x"])
def test_other_architectures_do_not_map(prefix):
    assert canonical_from_prefix(prefix) is None


def test_split_kohya_compounds():
    want = "text_model.encoder.layers.0.self_attn.out_proj"
    assert split_kohya("text_model_encoder_layers_0_self_attn_out_proj") == want
    assert split_kohya("up_blocks_3_attentions_2_proj_out") == "up_blocks.3.attentions.2.proj_out"


def test_ldm_mapping_full_sd15_layout():
    # SD1.5: input_blocks 1,2 | 4,5 | 7,8 carry attentions; 3, 6, 9 are downsamplers
    assert ldm_to_diffusers_unet("input_blocks.8.1.proj_out") == "down_blocks.2.attentions.1.proj_out"
    assert ldm_to_diffusers_unet("input_blocks.10.0.in_layers.2") == "down_blocks.3.resnets.0.conv1"
    assert ldm_to_diffusers_unet("output_blocks.11.1.proj_in") == "up_blocks.3.attentions.2.proj_in"
    assert ldm_to_diffusers_unet("output_blocks.8.2.conv") == "up_blocks.2.upsamplers.0.conv"
    assert ldm_to_diffusers_unet("out.2") == "conv_out"
    assert ldm_to_diffusers_unet("foo.bar") is None


@pytest.mark.parametrize("granularity,want", [
    ("matrix", f"unet:{ATTN}"),
    ("layer", "unet:down_blocks.1.attentions.0.transformer_blocks.0"),
    ("block", "unet:down_blocks.1.attentions.0"),
    ("network", "unet:"),
])
def test_scopes(granularity, want):
    assert scope_of(f"unet:{ATTN}", granularity) == want


def test_scopes_outside_blocks_and_text():
    assert scope_of("unet:down_blocks.1.attentions.0.proj_in", "layer") == "unet:down_blocks.1.attentions.0"
    assert scope_of("unet:down_blocks.0.resnets.1.conv1", "block") == "unet:down_blocks.0.resnets.1"
    assert scope_of("unet:conv_in", "block") == "unet:conv_in"
    assert scope_of(f"te:{TE}", "block") == "te:text_model.encoder.layers.3"
    assert scope_of(f"te:{TE}", "layer") == "te:text_model.encoder.layers.3.self_attn"
    assert scope_of(f"te2:{TE}", "network") == "te2:"
    with pytest.raises(ValueError, match="granularity"):
        scope_of(f"te:{TE}", "blocks")


def test_execution_order_matches_forward_order():
    names = ["unet:down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
             "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
             "unet:down_blocks.0.attentions.0.proj_out",
             "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "unet:down_blocks.0.attentions.0.proj_in",
             "unet:down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
             "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
             "unet:down_blocks.0.resnets.0.conv2", "unet:down_blocks.0.resnets.0.conv1",
             "unet:down_blocks.0.resnets.0.time_emb_proj", "unet:up_blocks.0.resnets.0.conv1",
             "unet:mid_block.attentions.0.proj_in", "unet:down_blocks.10.resnets.0.conv1"]
    got = sorted(names, key=execution_key)
    assert got == ["unet:down_blocks.0.resnets.0.conv1", "unet:down_blocks.0.resnets.0.time_emb_proj",
                   "unet:down_blocks.0.resnets.0.conv2", "unet:down_blocks.0.attentions.0.proj_in",
                   "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                   "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
                   "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                   "unet:down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
                   "unet:down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
                   "unet:down_blocks.0.attentions.0.proj_out", "unet:down_blocks.10.resnets.0.conv1",
                   "unet:mid_block.attentions.0.proj_in", "unet:up_blocks.0.resnets.0.conv1"]
