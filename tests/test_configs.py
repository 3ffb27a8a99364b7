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
  # The record is of the digits network before it was sized for 8x8 (configs/digits_edm.py).
  config.model.nf, config.model.attn_resolutions = 32, (4,)
  config.model.resblock_type, config.model.fir = 'biggan', True
  # And of CD's schedule and final samplers before the main job was cut to 10 minutes.
  config.training.batch_size, config.training.num_steps = 128, 2000
  config.training.final_samplers = ('onestep', 'multistep', 'teacher_heun')
  migrated = config_utils.migrate(old)
  # The moved fields land in `noise` with today's values; noise fields added since (e.g.
  # time_conditioning) are absent from the record and keep their defaults (checked below).
  moved = {new.split('.')[1] for new in config_utils.MOVED_FIELDS.values()}
  assert migrated['noise'] == {k: v for k, v in config.noise.to_dict().items() if k in moved}
  assert 'sigma_max' not in migrated['model']
  # Every field of the old record has today's value (fields added since keep their defaults).
  assert config_utils.config_differences(old, config, ignore=()) == {}
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
