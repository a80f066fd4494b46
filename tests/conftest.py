"""Shared fixtures: tiny random Hugging Face models saved to disk and small preference datasets."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def converter_cache(name: str) -> Path:
    """checkpoints/.cache/<name>/<digest of gguf_convert.py>: a GGUF conversion cache keyed by the
    converter's source, so runs after the first skip the conversion (~30 s) and any change to
    the converter converts afresh (its own cache key is the GGUF file only). Older digests go."""
    import hashlib
    import shutil

    from jaxpref.models import gguf_convert

    root = REPO / "checkpoints" / ".cache" / name
    digest = hashlib.sha256(Path(gguf_convert.__file__).read_bytes()).hexdigest()[:12]
    for old in root.glob("*"):
        if old.name != digest:
            shutil.rmtree(old, ignore_errors=True)
    return root / digest


def make_tokenizer(path: Path):
    """A small word-level tokenizer with BOS/EOS/pad and a ChatML template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "\n"]
    words += [w for w in ("the a is of to and what answer yes no good bad red blue green sky grass "
                          "sun moon cat dog one two three four five six seven eight nine ten question "
                          "please thanks hello world colour opposite hot cold big small fast slow "
                          "happy sad it i you we they this that".split())]
    words += [str(i) for i in range(40)] + ["?", ".", "!", ",", ":", "'"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    vocab["[UNK]"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="[UNK]")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(path)
    return tok


def save_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(path)
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tok.get_vocab()), hidden_size=64, intermediate_size=96,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, tie_word_embeddings=False,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(path)
    return path


def perturbed_llama(vocab_size: int, seed: int = 0, **overrides):
    """A tiny random transformers Llama (2 layers, hidden 64, grouped-query attention) with every
    weight moved by 0.05 * N(0, 1), so that no bias or norm is at its trivial init."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               tie_word_embeddings=False)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


PAIRS = [
    ("what is the colour of the sky ?", "the sky is blue .", "the sky is green ."),
    ("what is the colour of grass ?", "grass is green .", "grass is red ."),
    ("what is two and two ?", "it is four .", "it is five ."),
    ("what is the opposite of hot ?", "cold .", "big ."),
    ("what is the opposite of fast ?", "slow .", "happy ."),
    ("is the sun hot ?", "yes , it is hot .", "no ."),
    ("what is one and one ?", "it is two .", "it is three ."),
    ("what is the opposite of big ?", "small .", "fast ."),
]


def head_inputs(vocab: int, rows: int = 3, k: int = 5, d: int = 16):
    """Random LM-head inputs: hidden [rows, k, d], head weight [d, vocab], target ids [rows, k]."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((rows, k, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((d, vocab)), jnp.float32),
            jnp.asarray(rng.integers(0, vocab, (rows, k)), jnp.int32))


def write_pairs(path: Path, n: int = 16) -> Path:
    rows = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS]
    rows = (rows * (n // len(rows) + 1))[:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


def write_config(path: Path, model_dir: Path, data: Path, **sections) -> Path:
    import yaml

    cfg = {
        "models": [{"name": "tiny", "huggingface_id": str(model_dir)}],
        "dataset": {"name": str(data)},
        "post_training": {"method": "dpo", "beta": 0.1},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1.0e-3,
                     "max_length": 64, "logging_steps": 1, "seed": 0},
        "logging": {"report_to": [], "progress_bar": False},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    if cfg["post_training"].get("method") in ("grpo", "rloo", "online_dpo", "ppo") and \
            "max_length" not in sections.get("training", {}):
        del cfg["training"]["max_length"]   # an offline key: online runs refuse it
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def save_moved_adapter(base, path: Path, seed: int = 3) -> Path:
    """A PEFT LoRA (r 4, alpha 8, on q_proj and v_proj) of the transformers model `base`, with B
    scaled up so that the policy sits visibly away from the base, saved to `path`."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, init_lora_weights=False,
                                                 task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(30.0)
    peft_model.save_pretrained(path)
    return path


# The slow group (`pytest -m slow`, README): whole-process and multi-process runs of 15 s or more
# here, and the per-architecture sweeps beyond the parameters kept below. Every architecture's
# logits against transformers stay in the default set (tests/test_model_parity.py).
SLOW_TESTS = {
    "test_an_epochs_last_shorter_step_trains_like_the_same_config_without_it",
    "test_a_budget_of_one_pair_needs_more_micro_batches_and_skips_empty_ones",
    "test_multi_model_resume_skips_finished_and_finishes_the_rest",
    "test_ctrl_c_saves_a_checkpoint_and_resume_matches_uninterrupted",
    "test_sigkill_then_resume_matches_uninterrupted",
    "test_two_processes_checkpoint_and_resume_exactly",
    "test_meshes_give_single_device_numbers",
    "test_two_processes_equal_one",
    "test_cli_train_export_and_continue",
    "test_train_evaluate_export_command_lines_never_import_torch",
    "test_allow_torch_env_lets_transformers_import_torch",
    "test_smollm2_greedy_matches_transformers_generate",
    "test_smollm2_greedy_with_peft_adapter_matches_transformers",
    "test_dpo_on_a_mixture_of_experts_adds_the_router_loss_as_trl",
    "test_trained_expert_adapter_and_merged_export_match_peft_and_transformers",
    "test_the_cli_run_and_its_dry_run_with_a_token_budget",
    "test_dry_run_on_two_devices_plans_what_the_run_does",
    "test_resume_with_the_speed_settings_changed_continues_the_run",
    "test_resume_refuses_a_change_of_the_dropout_masks_or_tf32",
    "test_dry_run_resume_of_a_finished_run_says_what_the_run_does",
    "test_unreachable_coordinator_times_out_with_one_line",
    "test_token_ids_with_torch_hidden_equal_torch_importable",
    "test_count_takes_eval_prompts",
    "test_cli_prompt_text_is_one_user_message",
    "test_sampling_time_is_left_out_of_eta_and_tokens_per_second",
    "test_orpo_first_step_equals_trl",      # ORPO against TRL stays in the default set: tests/test_trl_orpo_cpo.py
    "test_kto_on_paired_data_equals_trl",   # KTO against TRL stays: test_kto_first_step_equals_trl
}
# test -> the parameter ids (prefixes) that stay in the default set; the rest are slow.
SWEEPS = {
    "test_seed_quickstart_lora_without_targets_takes_peft_default": ("gpt_neox",),
    "test_llama3_rope_without_its_original_length_is_transformers": ("llama",),
    "test_longrope_original_length_is_the_one_transformers_reads": ("phi3",),
    "test_peft_adapter_on_the_embedding_or_head_is_refused_by_name": ("llama-lm_head",),
    "test_resume_around_an_epochs_last_shorter_step_is_exact": ("5",),
    "test_precomputed_reference_equals_live_and_is_reused": ("2-1",),
    "test_config_variants_match_transformers": ("gemma2_gelu", "qwen2_attention_bias", "llama_longrope",
                                                "qwen2_yarn_mscale"),
    "test_exported_adapter_matches_peft_logits": ("llama-", "mixtral-"),
    "test_peft_made_adapter_loads_with_peft_logits": ("llama-", "mixtral-"),
    "test_reference_is_base_with_adapter_off_no_copy": ("llama", "mixtral"),
    "test_merged_export_matches_in_transformers": ("llama-", "mixtral-"),
    "test_adapter_roundtrip_is_identity": ("llama", "mixtral"),
    "test_peft_adapter_on_some_layers_loads_as_zeros_elsewhere": ("llama", "mixtral"),
    "test_traced_window_is_the_static_one": ("shared_prompt+pf-",),
    "test_cpo_simpo_first_step_equals_trl_cpo_trainer": ("cpo-sigmoid-alpha1.0-plain", "simpo-simpo-alpha0.0-plain"),
    "test_greedy_batch_matches_transformers_generate": ("llama", "mistral_window", "phi3_longrope_long"),
    "test_greedy_with_peft_adapter_matches_transformers": ("llama",),
    "test_expert_adapter_loads_in_peft_with_our_logits": ("mixtral-", "qwen3_moe-attention+experts"),
    "test_evaluate_logps_match_transformers_and_peft": ("gemma2-",),
    "test_qwen3_moe_gguf_matches_transformers": ("32",),
    "test_token_budget_trains_like_the_same_config_without_it": ("dpo_rpo-shared_prompt",),
    "test_sliding_window_in_every_layout": ("None-keep_start-mistral",),
    "test_layouts_give_the_same_sequence_logps": ("14-",),
    "test_orpo_first_step_equals_trl_orpo_trainer": ("plain-64",),
    "test_batched_prompts_give_the_tokens_of_one_at_a_time": ("llama",),
    "test_other_bodies_score_as_trl": ("gpt2", "gpt_neox"),
    "test_sequences_without_prompt_score_as_trl": ("ld_alpha-keep_end", "ipo-empty_prompt-padded",
                                                   "sigmoid_norm-empty_prompt-sft"),
    "test_gradient_checkpointing_keeps_gradients": ("llama",),
    "test_recompute_activations_keeps_gradients_in_less_memory": ("llama",),
    # Gemma 3's 262k-token tokenizer takes ~45 s to read from its GGUF and ~7 s a case: slow group only.
    "test_token_ids_equal_trl_preprocessing": ("standard-smollm2", "standard-gpt2_style", "conversational-smollm2",
                                               "conversational-gpt2_style",
                                               "implicit-smollm2", "implicit-gpt2_style",
                                               "implicit_conversational-smollm2",
                                               "implicit_conversational-gpt2_style"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.originalname or item.name
        param = item.callspec.id if hasattr(item, "callspec") else ""
        if name in SLOW_TESTS or (name in SWEEPS and not param.startswith(SWEEPS[name])):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_logreport(report):
    """With JAXPREF_FAILURE_LOG set (the GPU check), each failure's node id and the end of its
    traceback are appended there as it happens, so a run cut by its time limit still says why."""
    path = os.environ.get("JAXPREF_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"== {report.nodeid} ({report.when})\n{report.longreprtext[-2500:]}\n")
