"""PyTorch checkpoints and pickles read with NumPy only: no PyTorch, no code from the file is run.

Three containers hold the released networks:
  - `torch.save` files (`.pt`, the default zip format since PyTorch 1.6): `<archive>/data.pkl`, a
    pickle whose storages are persistent ids ('storage', type, key, location, numel) naming the raw
    little-endian bytes in `<archive>/data/<key>` (openai/consistency_models' state dicts).
  - legacy `torch.save` streams: magic number, protocol version and system info pickles, the pickle
    of the object, the pickle of its storage keys, then per key an int64 element count and the bytes.
    Every tensor in a plain pickle is one of these streams (`torch.storage._load_from_bytes`).
  - plain pickles of `torch_utils.persistence` objects (NVlabs/edm and edm2 `.pkl` snapshots): each
    network module is pickled as `_reconstruct_persistent_obj(meta)`, meta holding the module's source
    code (ignored here), its class name and its `__dict__` (parameters, buffers, submodules, init args).

The unpickler resolves only the globals these need (containers, tensor and storage rebuilders, the
persistence hook, NumPy scalars) to stand-ins defined here, and refuses every other global by name:
a pickle cannot make it import or call anything else. Tensors come back as NumPy arrays, modules as
`Module` records (`state_dict` flattens one like `torch.nn.Module.state_dict`).
"""

import collections
import io
import os
import pickle
import zipfile
from typing import Any, BinaryIO, Callable

import numpy as np

from cm_jax.errors import ConversionError

_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c  # torch.serialization.MAGIC_NUMBER
_PROTOCOL_VERSION = 1001

# PyTorch storage classes -> element dtype. bfloat16 has no NumPy dtype: its bits are read as uint16.
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'HalfStorage': np.float16, 'DoubleStorage': np.float64,
    'BFloat16Storage': 'bfloat16', 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'UntypedStorage': np.uint8,
}


class Module:
  """A pickled `torch.nn.Module`: its class name and `__dict__`; for `torch_utils.persistence`
  objects also the arguments its constructor was called with (`init_kwargs`)."""

  def __init__(self, class_name: str = '', state: dict | None = None):
    self.class_name = class_name
    self.__dict__.update(state or {})

  @property
  def init_kwargs(self) -> dict:
    return dict(self.__dict__.get('_init_kwargs') or {})

  @property
  def modules(self) -> dict:
    return {k: v for k, v in (self.__dict__.get('_modules') or {}).items() if v is not None}

  def __repr__(self) -> str:
    return f'Module({self.class_name})'


def state_dict(module: Module, prefix: str = '') -> dict[str, np.ndarray]:
  """{dotted name: array} of a module's parameters and buffers, in `torch.nn.Module.state_dict` order
  (a module's own parameters, then its buffers, then each submodule's)."""
  out = {}
  for group in ('_parameters', '_buffers'):
    for name, value in (module.__dict__.get(group) or {}).items():
      if value is not None:
        out[prefix + name] = value
  for name, child in module.modules.items():
    if isinstance(child, Module):
      out.update(state_dict(child, f'{prefix}{name}.'))
  return out


class _PlainModule(Module):
  """Stand-in for a torch.nn class (ModuleDict, ModuleList, ...) rebuilt by copyreg."""

  def __init__(self):  # pylint: disable=super-init-not-called
    pass


class _Storage:
  """A storage: its dtype and element count, and its data once read."""

  def __init__(self, dtype, numel: int, data: np.ndarray | None = None):
    self.dtype, self.numel, self.data = dtype, int(numel), data


class _TensorRef:
  """A tensor rebuilt from a storage, made an array once every storage has its data."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

  def array(self) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise ConversionError('A tensor of the file has no data (the file is truncated).')
    if self.size and min(self.size) > 0:
      last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
      if self.offset < 0 or last >= data.size or min(self.stride) < 0:
        raise ConversionError('A tensor of the file lies outside its storage (the file is damaged).')
    elif self.offset > data.size:
      raise ConversionError('A tensor of the file lies outside its storage (the file is damaged).')
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size,
        strides=tuple(s * data.itemsize for s in self.stride), writeable=False)
    array = np.array(view)  # A copy: a view would keep the whole storage alive.
    if self.storage.dtype == 'bfloat16':
      array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _storage_type(name: str):
  def storage_type():  # Never called: the class object only names the dtype in persistent ids.
    raise ConversionError(f'torch.{name} cannot be called.')
  storage_type.dtype = _STORAGE_DTYPES[name]
  return storage_type


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata: nothing a converted array needs.
  if not isinstance(storage, _Storage):
    raise ConversionError('A tensor of the file is not backed by a storage; it cannot be read.')
  return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused
  return data


def _reconstruct_persistent_obj(meta: dict) -> Module:
  """torch_utils.persistence's hook: the pickled module's record, without running its source."""
  if not isinstance(meta, dict) or meta.get('type') != 'class':
    raise ConversionError('A torch_utils.persistence object of an unknown kind is in the file.')
  state = meta.get('state') or {}
  return Module(str(meta.get('class_name', '')), dict(state))


def _reconstructor(cls, base, state):
  # copyreg._reconstructor(cls, object, None) is how a plain torch.nn container is pickled.
  if not (isinstance(cls, type) and issubclass(cls, _PlainModule)) or base is not object or state:
    raise ConversionError('The file reconstructs an object of a kind this reader refuses.')
  return cls()


def _latin1(text, encoding='latin1'):
  # Protocol-2 pickles write bytes as _codecs.encode(str, 'latin1').
  if not isinstance(text, str) or encoding != 'latin1':
    raise ConversionError('The file encodes bytes in an unexpected way.')
  return text.encode('latin1')


class _EasyDict(dict):
  """dnnlib.util.EasyDict, as a plain dict."""



def _numpy_globals() -> dict:
  try:
    from numpy._core import multiarray  # pylint: disable=g-import-not-at-top
  except ImportError:  # NumPy 1.
    from numpy.core import multiarray  # pylint: disable=g-import-not-at-top
  table = {}
  for package in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    table[(package, 'scalar')] = multiarray.scalar
    table[(package, '_reconstruct')] = multiarray._reconstruct  # pylint: disable=protected-access
  table[('numpy', 'dtype')] = np.dtype
  table[('numpy', 'ndarray')] = np.ndarray
  return table


def _safe_globals(load_from_bytes: Callable) -> dict:
  table = {
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('builtins', 'set'): set,
      ('builtins', 'frozenset'): frozenset,
      ('builtins', 'object'): object,
      ('copyreg', '_reconstructor'): _reconstructor,
      ('_codecs', 'encode'): _latin1,
      ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
      ('torch', 'Size'): tuple,
      ('torch.storage', '_load_from_bytes'): load_from_bytes,
      ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
      ('dnnlib.util', 'EasyDict'): _EasyDict,
      **_numpy_globals(),
  }
  for name in _STORAGE_DTYPES:
    table[('torch', name)] = _storage_type(name)
  return table


_PLAIN_MODULES: dict[str, type] = {}


def _plain_module_class(module: str, name: str) -> type:
  key = f'{module}.{name}'
  if key not in _PLAIN_MODULES:
    _PLAIN_MODULES[key] = type(name, (_PlainModule,), {'torch_class': key})
  return _PLAIN_MODULES[key]


class _Unpickler(pickle.Unpickler):
  """An unpickler that resolves only the globals a network checkpoint needs."""

  def __init__(self, file: BinaryIO, source: str, persistent_load: Callable | None = None):
    super().__init__(file)
    self._source = source
    self._persistent = persistent_load
    self._globals = _safe_globals(lambda data: _load_from_bytes(data, source))

  def find_class(self, module: str, name: str):
    if (module, name) in self._globals:
      return self._globals[(module, name)]
    if module.startswith('torch.nn.modules.') and name[:1].isupper():
      return _plain_module_class(module, name)
    raise ConversionError(
        f'{self._source}: refusing to load {module}.{name}: this reader takes tensors, containers '
        'and the torch_utils.persistence networks of NVlabs/edm and edm2 only. The file is not a '
        'network checkpoint of a supported kind (or it is unsafe to unpickle).')

  def persistent_load(self, pid):
    if self._persistent is None:
      raise ConversionError(f'{self._source}: unexpected persistent id {pid!r} in a plain pickle.')
    return self._persistent(pid)


def _storage_of(pid, source: str, storages: dict, make: Callable[[Any, str, int], _Storage]):
  """A ('storage', type, key, location, numel[, view]) persistent id -> its (shared) _Storage."""
  if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage':
    raise ConversionError(f'{source}: unknown persistent id {pid!r}.')
  storage_type, key, _, numel = pid[1:5]
  dtype = getattr(storage_type, 'dtype', None)
  if dtype is None:
    raise ConversionError(f'{source}: unknown storage type {storage_type!r}.')
  key = str(key)
  if key not in storages:
    storages[key] = make(dtype, key, int(numel))
  storage = storages[key]
  view = pid[5] if len(pid) > 5 else None
  if view is not None:  # Views into a root storage, written by PyTorch before 1.0.
    _, offset, view_size = view
    return _ViewStorage(storage, int(offset), int(view_size))
  return storage


class _ViewStorage(_Storage):
  """A legacy view into a root storage (whose data may be read after the pickle)."""

  def __init__(self, root: _Storage, offset: int, numel: int):  # pylint: disable=super-init-not-called
    self.root, self.offset, self.dtype, self.numel = root, offset, root.dtype, numel

  @property
  def data(self):
    root = self.root.data
    return None if root is None else root[self.offset:self.offset + self.numel]


def _numpy_dtype(dtype) -> np.dtype:
  return np.dtype(np.uint16) if dtype == 'bfloat16' else np.dtype(dtype)


def _materialise(value):
  """Replaces every _TensorRef in nested containers and modules by its array."""
  if isinstance(value, _TensorRef):
    return value.array()
  if isinstance(value, Module):
    for key, item in list(value.__dict__.items()):
      value.__dict__[key] = _materialise(item)
    return value
  if isinstance(value, dict):
    for key in list(value.keys()):
      value[key] = _materialise(value[key])
    return value
  if isinstance(value, list):
    return [_materialise(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_materialise(v) for v in value)
  return value


def _read_legacy(stream: BinaryIO, source: str) -> Any:
  """A legacy torch.save stream (after its magic number), storages filled from the tail."""
  unpickler = lambda persistent=None: _Unpickler(stream, source, persistent)
  if unpickler().load() != _PROTOCOL_VERSION:
    raise ConversionError(f'{source}: unsupported torch.save protocol version.')
  unpickler().load()  # System info (byte order and type sizes of the writer).
  storages: dict[str, _Storage] = {}
  result = unpickler(lambda pid: _storage_of(
      pid, source, storages, lambda dtype, key, numel: _Storage(dtype, numel))).load()
  keys = unpickler().load()
  for key in keys:
    storage = storages.get(str(key))
    if storage is None:
      raise ConversionError(f'{source}: storage {key!r} is listed but never used.')
    dtype = _numpy_dtype(storage.dtype)
    header = stream.read(8)
    if len(header) != 8:
      raise ConversionError(f'{source}: the file ends before the data of storage {key!r}.')
    count = int(np.frombuffer(header, '<i8')[0])
    data = stream.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
      raise ConversionError(f'{source}: the file ends inside the data of storage {key!r}.')
    storage.data = np.frombuffer(data, dtype.newbyteorder('<'))
  return result


def _load_from_bytes(data: bytes, source: str) -> _Storage:
  """torch.storage._load_from_bytes: one storage as a legacy torch.save stream."""
  if not isinstance(data, (bytes, bytearray)):
    raise ConversionError(f'{source}: a storage is not stored as bytes.')
  stream = io.BytesIO(data)
  if _Unpickler(stream, source).load() != _MAGIC_NUMBER:
    raise ConversionError(f'{source}: a storage in the pickle is not a torch.save stream.')
  storage = _read_legacy(stream, source)
  if not isinstance(storage, _Storage):
    raise ConversionError(f'{source}: a storage in the pickle holds another object.')
  return storage


def _read_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
    if not pickles:
      raise ConversionError(f'{path} is a zip file but not a torch.save checkpoint (no data.pkl).')
    prefix = pickles[0][:-len('data.pkl')]
    order = (archive.read(prefix + 'byteorder').decode().strip()
             if prefix + 'byteorder' in names else 'little')
    storages: dict[str, _Storage] = {}

    def make(dtype, key, numel):
      raw = archive.read(f'{prefix}data/{key}')
      dtype_np = _numpy_dtype(dtype).newbyteorder('<' if order == 'little' else '>')
      if len(raw) < numel * dtype_np.itemsize:
        raise ConversionError(f'{path}: storage {key} is shorter than its {numel} elements.')
      return _Storage(dtype, numel, np.frombuffer(raw, dtype_np, count=numel))

    with archive.open(pickles[0]) as stream:
      return _materialise(_Unpickler(
          stream, path, lambda pid: _storage_of(pid, path, storages, make)).load())


def load(path: str | os.PathLike) -> Any:
  """The object in a torch.save file or a (torch_utils.persistence) pickle, tensors as arrays.

  Raises:
    ConversionError: the file is missing, of another kind, damaged, or names a global this reader
      does not resolve.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f'{path} does not exist (or is not a file).')
  if zipfile.is_zipfile(path):
    return _read_zip(path)
  with open(path, 'rb') as f:
    try:
      first = _Unpickler(f, path).load()
      if isinstance(first, int) and first == _MAGIC_NUMBER:
        return _materialise(_read_legacy(f, path))
      return _materialise(first)
    except ConversionError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      raise ConversionError(f'{path} cannot be read as a torch.save file or a pickle '
                            f'({type(error).__name__}: {error}).') from None

