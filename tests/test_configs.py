"""Config files and the workdir's record of them: old records keep working after fields moved."""

import json
import os
import shutil

import pytest

from cm_jax import config_utils
from cm_jax.errors import ConfigError
from configs import digits_cd

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
# configs/digits_cd.py's config.json as written before the noise levels moved from `model` to `noise`.
OLD_RECORD = os.path.join(FIXTURES, 'config_digits_cd_before_noise_block.json')


def test_a_record_from_before_the_noise_block_is_the_same_run(tmp_path):
  with open(OLD_RECORD) as f:
    old = json.load(f)
  assert 'sigma_max' in old['model'] and 'noise' not in old
  config = digits_cd.get_config()
  current = json.loads(config.to_json_best_effort())
  # Fields added after the record was written (the streaming input's): their defaults read the
  # digits as before, bit for bit, so the record stands for the same run.
  for key in ('resize', 'folder_labels', 'bad_files', 'loader'):
    del current['data'][key]
  assert config_utils.migrate(old) == current
  shutil.copy(OLD_RECORD, tmp_path / 'config.json')
  config_utils.check_workdir(config, str(tmp_path))  # The same command resumes it.
  config.noise.sigma_max = 40.0
  with pytest.raises(Exception, match=r'noise.sigma_max: 80.0 in the workdir, 40.0 now'):
    config_utils.check_workdir(config, str(tmp_path))


def test_an_override_of_a_moved_field_says_where_it_went():
  with pytest.raises(ConfigError, match='--config.model.sigma_data: this field is now '
                                        '--config.noise.sigma_data'):
    config_utils.check_override_keys(digits_cd.get_config(), ['model.sigma_data'])
  config_utils.check_override_keys(digits_cd.get_config(), ['noise.sigma_data', 'model.nf'])
