"""The one way in for settings: every bad value named with its allowed values."""

import dataclasses

import pytest

from helpers.config import TrainConfig
from helpers.errors import ParameterError


def test_config_rejects_bad_values_by_name():
    with pytest.raises(ParameterError, match="arch='vgg16'; allowed: 'resnet50', 'resnet18'"):
        TrainConfig("s3://b/x", arch="vgg16")
    with pytest.raises(ParameterError, match="resume=True needs checkpoint_url"):
        TrainConfig("s3://b/x", resume=True)
    with pytest.raises(ParameterError, match="val_fraction=1.5; allowed: strictly between 0 and 1"):
        TrainConfig("s3://b/x", val_fraction=1.5)
    with pytest.raises(ParameterError, match="checkpoint_url='/tmp/c' must be shared storage"):
        TrainConfig("s3://b/x", checkpoint_url="/tmp/c").check_placement("tcp://10.0.0.5:8786")
    TrainConfig("s3://b/x", checkpoint_url="/tmp/c").check_placement("local")


def test_every_job_publishes_on_its_own_topic():
    a, b = TrainConfig("s3://b/x"), TrainConfig("s3://b/x")
    assert a.topic != b.topic and a.topic.startswith("training-")
    assert dataclasses.replace(a, epochs=2).topic == a.topic  # the same job keeps its topic
