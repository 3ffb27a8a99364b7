r"""sCD on CIFAR-10 (Lu & Song 2024, App. G.2): continuous-time consistency distillation of the
TrigFlow teacher. 1-step / 2-step FID 3.66 / 2.52 in the paper.

  python launch.py --config=configs/cifar10_scd.py --workdir=runs/cifar10_scd \
      --config.teacher.workdir=runs/cifar10_trigflow --config.data.data_dir=/path/to/tensorflow_datasets

As configs/cifar10_sct.py (the same network, settings and differences), with dx_t/dt from the
teacher's EMA, the student starting from it, and dropout 0. The paper does not state the step
count: 500k here, as NVlabs/FastGen's config_scd_cifar10.py.

Variant `:edm_teacher` distils configs/cifar10_edm.py's NCSN++ (c_noise = ln(sigma) / 4, Fourier
features of scale 16) as it is, the way FastGen distils EDM checkpoints; the paper finds that
conditioning less stable (its Fig. 4), and the digits sCD run (configs/digits_scd.py) is this kind.
"""

from configs import cifar10_edm, cifar10_sct, default


def get_config(teacher: str = 'trigflow'):
  config = default.get_config()
  config.method = 'scd'
  cifar10_edm.cifar10_data(config)
  if teacher == 'trigflow':
    cifar10_edm.trigflow_ddpmpp(config)
    config.teacher.config = 'configs/cifar10_edm.py:trigflow'
  elif teacher == 'edm_teacher':
    cifar10_edm.cifar10_ncsnpp(config.model)
    config.teacher.config = 'configs/cifar10_edm.py'
  else:
    raise ValueError(f'configs/cifar10_scd.py:{teacher}: use :trigflow or :edm_teacher.')
  config.model.dropout = 0.0
  cifar10_sct.scm_cifar10(config)
  default.paper_schedule(config, batch_size=512, num_steps=500_000, optimizer='radam', lr=1e-4,
                         ema_decays=(0.99929,), final_samplers=('onestep', 'multistep'))
  return config
