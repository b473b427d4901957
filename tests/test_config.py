"""The config: shipped files, merging, overrides, and every kind of bad value refused with its dotted key."""

import re
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.config_loading import load_config
from stages.common.errors import BadInputError

REPO = Path(__file__).resolve().parent.parent

CONFIGS = REPO / "configs"


def test_default_yaml_spells_out_exactly_the_built_in_defaults():
    assert load_config(CONFIGS / "default.yaml") == Config()
    assert load_config() == Config()


SHIPPED = sorted(path.name for path in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_setting_in_the_shipped_configs_carries_a_comment(name):
    for number, line in enumerate((CONFIGS / name).read_text().splitlines(), 1):
        if re.match(r"^\s*[A-Za-z_]+: *[^\s#]", line) or re.match(r"^\s*- ", line):  # a value, not a section
            assert "#" in line, f"{name}:{number} has no comment: {line!r}"


def test_default_yaml_names_every_field():
    text = (CONFIGS / "default.yaml").read_text()
    for section_name, section in Config.model_fields.items():
        assert re.search(rf"^{section_name}:", text, re.M), section_name
        for key in section.annotation.model_fields:
            assert re.search(rf"^  {key}:", text, re.M), f"{section_name}.{key} missing from default.yaml"


def test_quick_config_is_valid_and_small():
    config = load_config(CONFIGS / "quick.yaml")
    assert config.train.epochs <= 5 and config.train.num_samples <= 4
    assert set(config.train.search_space) == {"learning_rate", "dropout"}  # batch_size and lr_schedule removed


def test_quick_config_is_repeatable_on_two_cpus():
    from stages.training.train_settings import unrepeatable_because

    config = load_config(CONFIGS / "quick.yaml")
    assert config.train.scheduler == "fifo"
    assert unrepeatable_because(config.train, concurrent_trials=2) is None
    assert unrepeatable_because(config.train.model_copy(update={"scheduler": "asha"}), concurrent_trials=2)


def test_best_config_replays_a_default_runs_winner_as_one_trial_and_gates_on_99_5_percent():
    config = load_config(CONFIGS / "best.yaml")
    assert config.train.scheduler == "fifo" and config.train.trial_count == 1 and not config.train.search_space
    assert config.train.trial_seed is not None and config.train.lr_cycle_ends[-1] >= config.train.epochs
    assert "export-config RUN` printed these settings" in (CONFIGS / "best.yaml").read_text()
    assert config.evaluate.min_test_accuracy == 0.995
    assert config.model.batch_norm and config.model.augment_shift > 0 and config.model.label_smoothing > 0
    from stages.training.train_settings import unrepeatable_because

    assert unrepeatable_because(config.train, concurrent_trials=1) is None


def test_cluster_config_shares_the_run_folder_and_uses_gpus():
    config = load_config(CONFIGS / "cluster.yaml")
    assert config.run.root.startswith("s3://") and config.train.gpus_per_trial > 0


def test_overrides_are_yaml_and_merge_into_sections(tmp_path):
    config = load_config(
        None,
        [
            "train.epochs=2",
            "model.learning_rate=1e-3",  # YAML 1.1 would read this as a string
            f"data.mirrors=[{tmp_path}, https://example.org/mnist/]",
            "train.search_space.dropout={choice: [0.1, 0.2]}",
            "train.search_space.batch_size=null",
            "run.id=my-run",
        ],
    )
    assert config.train.epochs == 2 and config.model.learning_rate == 0.001
    assert config.data.mirrors == [str(tmp_path), "https://example.org/mnist/"]
    assert config.train.search_space["dropout"].args == (0.1, 0.2)
    from stages.training.train_settings import DEFAULT_SEARCH_SPACE

    assert set(config.train.search_space) == set(DEFAULT_SEARCH_SPACE) - {"batch_size"}
    assert config.train.num_samples == Config().train.num_samples
    assert config.run.id == "my-run"


def test_a_file_merges_onto_the_defaults_section_by_section(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 3\n  search_space:\n    dropout: {choice: [0.3]}\n")
    config = load_config(path, ["train.epochs=4"])
    assert config.train.epochs == 4 and config.train.num_samples == Config().train.num_samples == 16
    assert config.data == Config().data
    assert set(config.train.search_space) == {"dropout"}  # a search space in a file replaces the default one


@pytest.mark.parametrize("name", ["default.yaml", "quick.yaml", "best.yaml"])
def test_a_resolved_config_reproduces_the_run(tmp_path, name):
    config = load_config(CONFIGS / name, ["train.search_space.dense_units={randint: [256, 1025]}", "run.id=7"])
    resolved = tmp_path / "config.yaml"
    resolved.write_text(config.to_yaml())
    assert load_config(resolved) == config
    assert config.run.id == "7"


def test_errors_name_the_file_only_when_the_value_came_from_it(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 0\n")
    with pytest.raises(BadInputError, match=rf"^{re.escape(str(path))}: train.epochs: Input should be greater"):
        load_config(path)
    with pytest.raises(BadInputError, match=r"^model.dropout: Input should be less than 1"):
        load_config(path, ["train.epochs=2", "model.dropout=2.0"])


BAD_OVERRIDES = [
    (["train.num_sample=3"], "train.num_sample: unknown key (did you mean 'num_samples'?)"),
    (["trian.epochs=3"], "trian: unknown key (did you mean 'train'?)"),
    (["train.epochs=three"], "train.epochs: Input should be a valid integer (got 'three')"),
    (["train.epochs=0"], "train.epochs: Input should be greater than or equal to 1 (got 0)"),
    (["train.epochs=2.5"], "train.epochs: Input should be a valid integer"),
    (["model.dropout=1.0"], "model.dropout: Input should be less than 1 (got 1.0)"),
    (["model.optimizer=adagrad"], "model.optimizer: Input should be 'adam', 'adamw', 'sgd' or 'rmsprop'"),
    (["train.scheduler=median"],
     "train.scheduler: Input should be 'halving', 'asha', 'fifo', 'hyperband', 'bohb' or 'pbt'"),
    (["train.searcher=optuna", "train.search_space.batch_size={choice: [64, 256]}"],
     "train.include_base_trial: searcher optuna starts from the model section's values, and model.batch_size (128)"),
    (["train.searcher=optuna", "train.search_space.optimizer={grid: [adam, sgd]}"],
     "train.searcher: optuna cannot take grid entries (search_space.optimizer)"),
    (["train.scheduler=bohb"], "train.scheduler: bohb works only with searcher bohb, got searcher random"),
    (["model.lr_schedule=linear"], "model.lr_schedule: Input should be 'constant', 'cosine', 'warmup_cosine' or"),
    (["evaluate.ensemble_top_k=1"], "evaluate.ensemble_top_k: Input should be greater than or equal to 2"),
    (["train.gpus_per_trial=-1"], "train.gpus_per_trial: Input should be greater than or equal to 0"),
    (["evaluate.min_test_accuracy=99"], "evaluate.min_test_accuracy: Input should be less than or equal to 1"),
    (["data.mirrors=[]"], "data.mirrors: List should have at least 1 item"),
    (["data.mirrors=[/no/such/mirror]"], "data.mirrors[0]: mirror '/no/such/mirror': no such folder"),
    (["data.mirrors=[/etc/hostname]"], "data.mirrors[0]: mirror '/etc/hostname': is a file, not a folder"),
    (["data.cache_dir=/etc/hostname"], "data.cache_dir: '/etc/hostname' is not a folder"),
    (["ray.address=not an address"], "ray.address: 'not an address' is not a Ray address: use auto, HOST:PORT"),
    (["run.root=~"], "run.root: needs a folder (YAML reads a bare ~ as null"),
    (["ray.stage_resources={train: {a: 1}}"], "ray.stage_resources: 'train' is not a stage with a task of its own"),
    (["ray.stage_resources={download: {CPU: 2}}"], "download.CPU: Ray's built-in resources are set by the pipeline"),
    (["ray.stage_resources={download: {internet: 0}}"], "download.internet=0: give an amount above 0"),
    (["ray.stage_resources={download: [internet]}"], "ray.stage_resources.download: Input should be a valid dict"),
    (["train=5"], "train: should be a section: a mapping of keys to values (got 5)"),
    (["data.mirrors=[ftp://x/]"], "unsupported mirror scheme 'ftp://'"),
    (["data.mirrors=/some/dir"], "data.mirrors: Input should be a valid list"),
    (["data.validation_size=900", "data.max_train_images=900"], "data.validation_size: 900 leaves no training"),
    (["run.id=../escape"], "run.id: '../escape' is not a valid run id: use letters, digits"),
    (["train.search_space.dropot={uniform: [0.1, 0.2]}"], "'dropot' is not a hyperparameter (did you mean 'dropout'?)"),
    (["train.search_space.dropout={uniform: [0.1, 1.5]}"], "dropout: 1.5 is not allowed: Input should be less than 1"),
    (["train.search_space.batch_size={uniform: [16, 64]}"], "batch_size: 16.0 is not allowed: Input should be a valid "
                                                            "integer (use randint or choice for an integer"),
    (["train.search_space.dropout={normal: [0, 1]}"], "train.search_space.dropout: unknown distribution 'normal'"),
    (["train.search_space.learning_rate={loguniform: [0, 1]}"], "loguniform needs low > 0"),
    (["train.search_space.dropout={uniform: [0.5, 0.1]}"], "uniform needs low < high"),
    (["train.search_space.dropout={choice: []}"], "choice needs at least one value"),
    (["train.search_space.dropout=0.3"], "expected one mapping like {choice: [...]}"),
    (["train.epochs"], "--set expects KEY=VALUE"),
    (["=3"], "--set expects KEY=VALUE"),
    (["train.epochs.max=3"], "--set train.epochs.max: train.epochs is a value, not a section"),
    (["train.epochs=[1"], "--set train.epochs: invalid YAML"),
]


@pytest.mark.parametrize("overrides, message", BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_values_are_refused_naming_the_key(overrides, message):
    with pytest.raises(BadInputError) as caught:
        load_config(None, overrides)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    "content, message",
    [
        ("train:\n  epochs: [1\n", "invalid YAML at line"),
        ("- just\n- a list\n", "the config must be a mapping of sections, got list"),
        ("train:\n  epochs: 1\n  epochs: 2\n", "line 3: duplicate key 'epochs' (first at line 2)"),
        ("model:\n  dropout: 0.5\n  extra: 1\n", "model.extra: unknown key"),
    ],
)
def test_bad_files_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(BadInputError, match=re.escape(message)) as caught:
        load_config(path)
    assert str(caught.value).startswith(str(path))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(BadInputError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(BadInputError, match="cannot read config file"):
        load_config(tmp_path)  # a folder


def test_a_run_saved_before_the_tracking_section_existed_is_whole(tmp_path):
    """config.yaml of a run made before `tracking` was added: whole, and read with tracking's defaults."""
    from pipeline.config_loading import load_run_config
    from pipeline.run_files import DamagedFile, check_run_config
    from pipeline.run_folder import RunFolder

    older = Config().to_yaml().split("\ntracking:")[0] + "\n"
    (tmp_path / "config.yaml").write_text(older)
    assert check_run_config(RunFolder(str(tmp_path)))
    assert load_run_config(str(tmp_path / "config.yaml")).tracking == Config().tracking
    (tmp_path / "config.yaml").write_text(older.split("\nevaluate:")[0] + "\n")
    with pytest.raises(DamagedFile, match="no 'evaluate' section"):
        check_run_config(RunFolder(str(tmp_path)))
