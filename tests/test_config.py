import pytest

from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.models import create_model

BASE = {"model": {"name": "cnn"}, "data": {"name": "digits"}}


def test_defaults_and_overrides():
    cfg = load_config(BASE, ["train.max_steps=7", "optim.lr=0.5", "output.dir=/tmp/x", "train.seed=3",
                             "train.checkpoint_every=2"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 0.5 and cfg.train.seed == 3
    assert str(cfg.output_dir) == "/tmp/x" and cfg.train.checkpoint_every == 2
    assert cfg.task.kwargs["name"] == "classification"


def test_unknown_key_has_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown key `optim.lrr` \(did you mean `optim.lr`\?\)"):
        load_config({**BASE, "optim": {"lrr": 0.1}})


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match="unknown key `trian`.*did you mean `train`"):
        load_config({**BASE, "trian": {}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"`train.batch_size` = 'many' is invalid"):
        load_config(BASE, ["train.batch_size=many"])


def test_negative_learning_rate():
    with pytest.raises(ConfigError, match=r"`optim.lr` = -0.1 is invalid.*must be > 0"):
        load_config(BASE, ["optim.lr=-0.1"])


@pytest.mark.parametrize("value", ["25", "-1", "low", "1.5"])
def test_worker_nice_out_of_range_names_key_and_range(value):
    with pytest.raises(ConfigError, match=rf"`train.worker_nice` = '?{value}'? is invalid.*0 \(unchanged\) to 19"):
        load_config(BASE, [f"train.worker_nice={value}"])


def test_bad_choice_lists_allowed():
    with pytest.raises(ConfigError, match="optim.name.*'sgd', 'adam' or 'adamw'"):
        load_config(BASE, ["optim.name=rmsprop"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_model_kwargs_checked_against_builder():
    with pytest.raises(ConfigError, match=r"unknown key `model.num_clases` \(did you mean `num_classes`\?\)"):
        create_model("cnn", num_clases=3)


def test_unknown_keys_list_only_config_keys():
    from tunelab.tasks.base import build_task
    from tunelab.weights import init_weights

    with pytest.raises(ConfigError, match=r"`task.num_class`.*accepted: num_classes, labels$"):
        build_task("classification", num_class=3)
    with pytest.raises(ConfigError, match=r"`init.sd`.*did you mean `std`.*accepted: mean, std$"):
        init_weights(create_model("cnn"), "normal", sd=0.1)


def test_import_path_model():
    model = create_model("torch.nn:Linear", in_features=3, out_features=2)
    assert model.weight.shape == (2, 3)


def test_lr_auto_is_accepted():
    assert load_config(BASE, ["optim.lr=auto"]).optim.lr == "auto"


def test_model_settings_the_data_knows_are_filled_and_recorded():
    from tunelab.run import build_run

    logged = []
    cfg = load_config(BASE, ["data.classes=[0,1,2]"])
    run = build_run(cfg, log=logged.append)
    assert run.model.fc.out_features == 3 and cfg.model.kwargs["num_classes"] == 3  # config.yaml records it
    assert "from the data: model.num_classes=3" in logged
    kept = load_config(BASE, ["data.classes=[0,1,2]", "model.num_classes=5"])  # the recipe's value wins
    assert build_run(kept, log=lambda m: None).model.fc.out_features == 5
    linear = load_config({"model": {"name": "torch.nn:Linear", "in_features": 64, "out_features": 3},
                          "data": {"name": "digits", "flatten": True, "classes": [0, 1, 2]}})
    build_run(linear, log=lambda m: None)
    assert "num_classes" not in linear.model.kwargs  # only what the builder takes


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_len_counts_without_building_and_matches_the_batches(drop_last):
    from tunelab.data.base import ResumableBatchSampler

    for n in (0, 1, 5, 12, 13, 101):
        for bs in (1, 4, 12):
            for ws in (1, 2, 3):
                for rank in range(ws):
                    s = ResumableBatchSampler(n, bs, seed=1, drop_last=drop_last, rank=rank, world_size=ws)
                    batches = list(s)
                    assert len(s) == len(batches), (n, bs, ws, rank)
                    assert all(len(b) == bs for b in batches[:-1])
