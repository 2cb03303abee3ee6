// Cached group tables: the eager fast path of the optimizers (fused_opt/tables.py): CPU params run
// the CPU kernels from here; for other devices the table hands its checked addresses to the
// Triton backend.
//
// A step through the ops converts every tensor of every list at the dispatcher and checks it again
// (~0.2 us a tensor: most of a step for thousands of small tensors). A GroupTable remembers one
// param group's tensors and the packed launch over them; each step its check() gets only the
// group's param list, reads the grads itself and checks that nothing it remembers has changed:
// the same param objects with grads, in the same order; in each param's state dict the same
// tensor objects; every tensor still with the storage, size, dtype and layout it was packed with;
// grads that fit their params. A dense tensor that is not contiguous (channels_last, a transposed
// weight) walks as a flat array too, when its grad and states share its strides, as torch's
// autograd and zeros_like(preserve_format) give them. Those checks run in parallel, and ask for each entry's objects a
// few entries ahead (see kAhead). If anything differs it declines (returns false) and the optimizer
// takes the ordinary path, which rebuilds the table; else the step runs in a second call, once
// every group of the step has been checked. StateSnapshot covers the one thing a
// table cannot see cheaply: entries of optimizer.state added, removed or replaced.
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <atomic>
#include <stdexcept>
#include <string>

#include "fused_opt/checks.h"
#include "fused_opt/registration.h"
#include "fused_opt/table_binding.h"
#include "launch.h"

namespace fused_opt::cpu {
namespace {

namespace py = pybind11;
using OptTensor = std::optional<at::Tensor>;

// The optimizer's state dict as (param, per-param dict) pairs in order, holding references so
// that no object can be freed and its address reused by another.
class StateSnapshot {
 public:
  explicit StateSnapshot(const py::dict& state) : state_(state) {
    for (auto item : state) {
      items_.emplace_back(py::reinterpret_borrow<py::object>(item.first), py::reinterpret_borrow<py::object>(item.second));
    }
  }

  bool matches(const py::handle& state) const {
    if (state.ptr() != state_.ptr() || PyDict_Size(state.ptr()) != static_cast<Py_ssize_t>(items_.size())) return false;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    for (const auto& [k, v] : items_) {
      if (!PyDict_Next(state.ptr(), &pos, &key, &value) || key != k.ptr() || value != v.ptr()) return false;
    }
    return true;
  }

 private:
  py::object state_;
  std::vector<std::pair<py::object, py::object>> items_;
};

bool is_float_type(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A plain dense tensor on `device` whose memory a kernel may read and write as a flat array (its
// elements fill one block in some dimension order: contiguous, channels_last, transposed, ...).
bool plain(const at::Tensor& t, const c10::Device& device) {
  return t.defined() && t.layout() == at::kStrided && t.device() == device && t.has_storage() &&
         !t.unsafeGetTensorImpl()->is_python_dispatch() && !t.is_neg() && !t.is_conj() &&
         t.is_non_overlapping_and_dense();
}

// A step counter: a one-element float tensor on the CPU or on the params' device.
bool plain_step(const at::Tensor& s, const c10::Device& device) {
  return (plain(s, device) || plain(s, at::kCPU)) && s.numel() == 1 &&
         (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble);
}

// The tensor behind a Python object that is exactly a torch.Tensor or nn.Parameter (no subclass).
const at::Tensor* exact_tensor(PyObject* obj) {
  return obj != nullptr && THPVariable_CheckExact(obj) ? &THPVariable_Unpack(obj) : nullptr;
}

// A table's checks read, for each entry, heap objects that the forward and backward passes have
// pushed out of the cache: each tensor's TensorImpl and StorageImpl, the param's autograd meta, its
// state dict. Their time is memory latency, not work (~100 ns a tensor when each waits for the
// last). So the loops ask for the objects of the entry kAhead places on while they check the
// current one, and for what those objects point to once they have arrived.
constexpr size_t kAhead = 8;

void prefetch(const void* p, size_t bytes) {
#if defined(__GNUC__)
  for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(p) + off);
#endif
}

void prefetch_impl(const c10::TensorImpl* t) { prefetch(t, sizeof(c10::TensorImpl)); }

void prefetch_storage(const c10::TensorImpl* t) {  // reads t: call it once t has arrived
  if (const c10::StorageImpl* s = t->unsafe_storage().unsafeGetStorageImpl()) prefetch(s, sizeof(c10::StorageImpl));
}

enum class Family { Adam, RMSprop, SGD };

Family parse_family(const std::string& name) {
  if (name == "adam") return Family::Adam;
  if (name == "rmsprop") return Family::RMSprop;
  if (name == "sgd") return Family::SGD;
  throw std::invalid_argument("unknown family " + name);
}

class GroupTable {
 public:
  // params: the group's params that have grads, in group order; states: their per-param state
  // dicts (None for a stateless SGD); keys: the state key of slots 2, 3, 4 (None where the slot is unused); step_key: the
  // step counter's key (None for SGD); group_params: the group's whole param list; master_key: the
  // key of 16-bit params' float32 master copies (None: no master weights; with them, the states
  // are float32 too). Throws ValueError (nothing is cached) if any of it is unfit for the fast path.
  GroupTable(const std::string& family, const py::list& params, const py::list& states,
             const std::vector<std::optional<std::string>>& keys, const std::optional<std::string>& step_key,
             const py::object& group_params, const std::optional<std::string>& master_key)
      : family_(parse_family(family)) {
    if (keys.size() != kSlots - 2 || states.size() != params.size() || !PyList_Check(group_params.ptr())) {
      throw std::invalid_argument("bad table layout");
    }
    list_size_ = PyList_GET_SIZE(group_params.ptr());
    for (Py_ssize_t k = 0; k < list_size_; ++k) {  // where each packed param sits in the group's list
      if (place_.size() < params.size() && PyList_GET_ITEM(group_params.ptr(), k) == params[place_.size()].ptr()) {
        place_.push_back(k);
      } else {
        others_.push_back(k);
      }
    }
    if (place_.size() != params.size()) throw std::invalid_argument("params are not the group's, in order");
    launch_.slot_mask = 0b11;
    const auto slot = [&](int k, const std::optional<std::string>& key) {
      if (!key) return;
      keys_[k] = py::reinterpret_steal<py::object>(PyUnicode_InternFromString(key->c_str()));
      launch_.slot_mask |= 1 << k;
      state_slots_.push_back(k);
    };
    for (size_t k = 0; k < keys.size(); ++k) slot(static_cast<int>(k) + 2, keys[k]);
    slot(kMaster, master_key);
    if (step_key) step_key_ = py::reinterpret_steal<py::object>(PyUnicode_InternFromString(step_key->c_str()));
    const bool stateful = launch_.slot_mask != 0b11 || step_key_;
    const size_t n = params.size();
    entries_.reserve(n);
    launch_.tensors.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      Entry e;
      e.obj[0] = py::reinterpret_borrow<py::object>(params[i]);
      const at::Tensor* p = exact_tensor(e.obj[0].ptr());
      if (i == 0 && p) device_ = p->device();
      if (!p || !plain(*p, device_) || !is_float_type(p->scalar_type())) {
        throw std::invalid_argument("param is not a plain dense float tensor on the first param's device");
      }
      if (i == 0) {
        launch_.dtype = p->scalar_type();
        if (keys_[kMaster] && launch_.dtype != at::kHalf && launch_.dtype != at::kBFloat16) {
          throw std::invalid_argument("master weights are for float16 and bfloat16 params");
        }
        state_dtype_ = keys_[kMaster] ? at::kFloat : launch_.dtype;
      }
      if (p->scalar_type() != launch_.dtype) throw std::invalid_argument("params differ in dtype");
      e.tensor[0] = *p;
      e.state = py::reinterpret_borrow<py::object>(states[i]);
      if (stateful && !PyDict_Check(e.state.ptr())) throw std::invalid_argument("state is not a dict");
      Pointers ptr{p->data_ptr()};
      for (int k : state_slots_) {
        e.obj[k] = py::reinterpret_borrow<py::object>(PyDict_GetItem(e.state.ptr(), keys_[k].ptr()));
        const at::Tensor* t = exact_tensor(e.obj[k].ptr());
        if (!t || !plain(*t, device_) || t->scalar_type() != state_dtype_ || !same_layout(*t, *p)) {
          throw std::invalid_argument("state tensor does not fit its param");
        }
        e.tensor[k] = *t;
        ptr[k] = t->data_ptr();
      }
      if (step_key_) {
        e.step_obj = py::reinterpret_borrow<py::object>(PyDict_GetItem(e.state.ptr(), step_key_.ptr()));
        const at::Tensor* s = exact_tensor(e.step_obj.ptr());
        if (!s || !plain_step(*s, device_)) {
          throw std::invalid_argument("step counter is not a one-element float tensor on the cpu or the params' device");
        }
        e.step = *s;
        e.step_ptr = s->const_data_ptr();
        steps_.push_back(*s);
      }
      add_tensor(launch_, ptr, p->numel());
      entries_.push_back(std::move(e));
    }
  }

  // Stepping is in two calls, so that an optimizer can check every group before it writes any:
  // check(params) makes every check, keeps this step's grads and says whether the table can take
  // the step; then the family's call (adam, rmsprop, sgd) runs it, without checking again, or
  // declines (returns false) when check did not pass just before.
  bool check(const py::handle& params) {
    grads_.assign(entries_.size(), at::Tensor());
    checked_ = same_list(params.ptr()) && states_unchanged() && tensors_unchanged(params.ptr(), grads_);
    if (!checked_) grads_.clear();
    return checked_;
  }

  // Forgets what check kept (a step that raised before this table ran): the grads are not held.
  void release() {
    checked_ = false;
    grads_.clear();
  }

  bool adam(double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
            bool decoupled_weight_decay, double l1, bool l1_proximal, const OptTensor& lr_tensor,
            const OptTensor& grad_scale, const OptTensor& found_inf) {
    if (family_ != Family::Adam || state_mask() != (amsgrad ? 0b11111 : 0b01111)) return false;
    const AdamOptions o{beta1, beta2, eps, amsgrad, {maximize, weight_decay, decoupled_weight_decay, l1, l1_proximal}};
    return run(lr, lr_tensor, grad_scale, found_inf, [&] { cpu::adam(launch_, o); });
  }

  bool rmsprop(double lr, double alpha, double eps, double weight_decay, double momentum, bool centered, bool maximize,
               double l1, bool l1_proximal, const OptTensor& lr_tensor, const OptTensor& grad_scale,
               const OptTensor& found_inf) {
    const int mask = 0b111 | (centered ? 0b1000 : 0) | (momentum > 0.0 ? 0b10000 : 0);
    if (family_ != Family::RMSprop || state_mask() != mask) return false;
    const RMSpropOptions o{alpha, eps, momentum, centered, {maximize, weight_decay, false, l1, l1_proximal}};
    return run(lr, lr_tensor, grad_scale, found_inf, [&] { cpu::rmsprop(launch_, o); });
  }

  bool sgd(double lr, double weight_decay, double momentum, double dampening, bool nesterov, bool maximize,
           bool first_step, double l1, bool l1_proximal, const OptTensor& lr_tensor, const OptTensor& grad_scale,
           const OptTensor& found_inf) {
    if (family_ != Family::SGD || first_step || state_mask() != (momentum != 0.0 ? 0b111 : 0b11)) return false;
    const SGDOptions o{momentum, dampening, nesterov, false, {maximize, weight_decay, false, l1, l1_proximal}};
    return run(lr, lr_tensor, grad_scale, found_inf, [&] { cpu::sgd(launch_, o); });
  }

  size_t size() const { return entries_.size(); }

  // For kernels launched elsewhere (the CUDA and Triton backends): after check passed, this
  // step's grad addresses (int64, CPU); the launch is theirs.
  at::Tensor grad_pointers() {
    TORCH_CHECK(checked_, "GroupTable.grad_pointers: check() did not pass");
    at::Tensor out = at::empty({static_cast<int64_t>(entries_.size())}, at::kLong);
    auto ptrs = out.accessor<int64_t, 1>();
    for (size_t i = 0; i < entries_.size(); ++i) ptrs[i] = reinterpret_cast<int64_t>(launch_.tensors[i].ptr[1]);
    release();
    return out;
  }

  // After grad_pointers: adds one to each step counter if all live on the CPU
  // (here, without a per-tensor call from Python) and returns the new values (float64 [n]);
  // None when some live on the device (the caller advances those).
  std::optional<at::Tensor> advance_host_steps() {
    for (const at::Tensor& s : steps_) {
      if (!s.device().is_cpu()) return std::nullopt;
    }
    const std::vector<double> values = advance_steps(steps_);
    at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::kDouble);
    std::copy(values.begin(), values.end(), out.data_ptr<double>());
    return out;
  }

  // The packed addresses (int64 [6, n], CPU; slot order, the master copies' in row 5; the grads'
  // row and unused slots 0) and numels (int64 [n]).
  std::tuple<at::Tensor, at::Tensor> pointer_table() const {
    const auto n = static_cast<int64_t>(entries_.size());
    at::Tensor table = at::zeros({kPointers, n}, at::kLong);
    at::Tensor numels = at::empty({n}, at::kLong);
    auto rows = table.accessor<int64_t, 2>();
    auto sizes = numels.accessor<int64_t, 1>();
    for (int64_t i = 0; i < n; ++i) {
      const TensorJob& job = launch_.tensors[i];
      for (int k = 0; k < kPointers; ++k) rows[k][i] = k == 1 ? 0 : reinterpret_cast<int64_t>(job.ptr[k]);
      sizes[i] = job.numel;
    }
    return {table, numels};
  }

 private:
  struct Entry {
    std::array<py::object, kPointers> obj;  // the Python objects of the param (0), state tensors (2..) and master copy
    std::array<at::Tensor, kPointers> tensor;
    py::object state;  // the param's state dict
    py::object step_obj;
    at::Tensor step;
    const void* step_ptr = nullptr;
  };

  template <typename Kernel>
  bool run(double lr, const OptTensor& lr_tensor, const OptTensor& grad_scale, const OptTensor& found_inf,
           const Kernel& kernel) {
    if (!checked_ || !device_.is_cpu()) return false;  // the CPU kernels; other devices use grad_pointers
    for (const OptTensor* t : {&lr_tensor, &grad_scale, &found_inf}) {
      if (t->has_value() && (!(*t)->defined() || (*t)->numel() != 1)) return false;  // the op says why
    }
    const std::vector<at::Tensor> grads = std::move(grads_);  // held until the kernel is done
    release();
    const StepScalars s = read_scalars(lr, lr_tensor, grad_scale, found_inf);
    if (s.skip) return true;
    const std::vector<double> steps = advance_steps(steps_);
    for (size_t i = 0; i < steps.size(); ++i) launch_.tensors[i].step = steps[i];
    launch_.lr = s.lr;
    launch_.inv_grad_scale = s.inv_grad_scale;
    py::gil_scoped_release no_gil;
    kernel();
    return true;
  }

  static c10::TensorImpl* impl(const at::Tensor& t) { return t.unsafeGetTensorImpl(); }

  // The group's list has its length of when the table was packed, and the params that were not
  // packed (no grad then) still have none. The packed ones are checked with their tensors.
  bool same_list(PyObject* list) const {
    if (!PyList_Check(list) || PyList_GET_SIZE(list) != list_size_) return false;
    for (Py_ssize_t k : others_) {
      PyObject* obj = PyList_GET_ITEM(list, k);
      if (!THPVariable_Check(obj) || THPVariable_Unpack(obj).unsafeGetTensorImpl()->grad().defined()) return false;
    }
    return true;
  }

  // In each param's state dict, the same objects under the state keys (a Python API call: under
  // the GIL, serial).
  bool states_unchanged() const {
    if (launch_.slot_mask == 0b11 && !step_key_) return true;  // no state dicts
    const size_t n = entries_.size();
    for (size_t i = 0; i < n; ++i) {
      if (i + 2 * kAhead < n) prefetch(entries_[i + 2 * kAhead].state.ptr(), sizeof(PyDictObject));
      if (i + kAhead < n) prefetch(reinterpret_cast<PyDictObject*>(entries_[i + kAhead].state.ptr())->ma_keys, 192);
      const Entry& e = entries_[i];
      for (int k : state_slots_) {
        if (!holds(e.state, keys_[k], e.obj[k])) return false;
      }
      if (step_key_ && !holds(e.state, step_key_, e.step_obj)) return false;
    }
    return true;
  }

  // Is `value` the very object under `key` in `dict`? (A key compared with an __eq__ that
  // raises: no, and the error is dropped.)
  static bool holds(const py::object& dict, const py::object& key, const py::object& value) {
    PyObject* found = PyDict_GetItemWithError(dict.ptr(), key.ptr());
    if (found == nullptr && PyErr_Occurred()) PyErr_Clear();
    return found == value.ptr();
  }

  // A packed tensor still has the memory, size, dtype and dense layout it was packed with (a
  // state's element order is checked against its param's).
  static bool same_memory(const at::Tensor& t, const void* ptr, int64_t numel, c10::ScalarType dtype,
                          const c10::Device& device) {
    return plain(t, device) && t.scalar_type() == dtype && t.numel() == numel && t.const_data_ptr() == ptr;
  }

  // Each packed param still at its place in `list`, with a grad that fits it (put into `grads`
  // and the launch), and every tensor as it was packed. In parallel: this reads no Python object
  // but the list's items (the GIL, held, keeps the list as it is), and at::parallel_for's threads
  // overlap the memory latency of thousands of tensors.
  bool tensors_unchanged(PyObject* list, std::vector<at::Tensor>& grads) {
    std::atomic<bool> same{true};
    at::parallel_for(0, static_cast<int64_t>(entries_.size()), kCheckGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end && same.load(std::memory_order_relaxed); ++i) {
        for (int stage = 0; stage < 4; ++stage) {
          const int64_t ahead = i + int64_t(2 * kAhead >> stage);
          if (ahead < end) prefetch_entry(entries_[ahead], stage);
        }
        const Entry& e = entries_[i];
        if (PyList_GET_ITEM(list, place_[i]) != e.obj[0].ptr()) {
          same.store(false, std::memory_order_relaxed);
          break;
        }
        grads[i] = impl(e.tensor[0])->grad();
        if (!entry_unchanged(e, launch_.tensors[i], grads[i])) same.store(false, std::memory_order_relaxed);
      }
    });
    return same.load();
  }

  // Asks for what entry_unchanged will read of `e`, in stages 2 * kAhead, kAhead, kAhead / 2 and
  // kAhead / 4 entries ahead: the tensors' impls; their storages and the param's autograd meta;
  // the grad's impl; its storage.
  void prefetch_entry(const Entry& e, int stage) const {
    const c10::TensorImpl* p = impl(e.tensor[0]);
    if (stage >= 2) {
      const c10::TensorImpl* g = p->grad().unsafeGetTensorImpl();
      return stage == 2 ? prefetch_impl(g) : prefetch_storage(g);
    }
    const auto fetch = stage == 0 ? prefetch_impl : prefetch_storage;
    fetch(p);
    for (int k : state_slots_) fetch(impl(e.tensor[k]));
    if (step_key_) fetch(impl(e.step));
    if (stage == 1) prefetch(p->autograd_meta(), 64);
  }

  // An entry's tensors against what was packed; writes only its own job's grad address. The grad
  // and the states must walk in the param's element order (same sizes and strides).
  bool entry_unchanged(const Entry& e, TensorJob& job, const at::Tensor& g) const {
    const c10::ScalarType dtype = launch_.dtype;
    const at::Tensor& p = e.tensor[0];
    if (!same_memory(p, job.ptr[0], job.numel, dtype, device_)) return false;
    if (!plain(g, device_) || g.scalar_type() != dtype || !same_layout(g, p)) return false;
    job.ptr[1] = g.data_ptr();
    for (int k : state_slots_) {
      if (!same_memory(e.tensor[k], job.ptr[k], job.numel, state_dtype_, device_) || !same_layout(e.tensor[k], p)) {
        return false;
      }
    }
    return !step_key_ || (plain_step(e.step, device_) && e.step.const_data_ptr() == e.step_ptr);
  }

  // The slot pattern of the family's options (the master copies' bit aside).
  int state_mask() const { return launch_.slot_mask & ~(1 << kMaster); }

  static constexpr int64_t kCheckGrain = 256;  // tensors a thread checks at least (~50 us: well over a parallel region's start)

  Family family_;
  c10::Device device_ = at::kCPU;
  std::array<py::object, kPointers> keys_;  // interned state keys of slots 2.. and the master copy (null: unused)
  std::vector<int> state_slots_;  // the slots of keys_ in use
  c10::ScalarType state_dtype_ = at::kFloat;  // of the states and master copies
  py::object step_key_;
  std::vector<Entry> entries_;
  Py_ssize_t list_size_ = 0;  // the group's param list: its length, where each entry's param is, the others
  std::vector<Py_ssize_t> place_, others_;
  std::vector<at::Tensor> steps_;
  std::vector<at::Tensor> grads_;  // this step's, from check until the step runs
  bool checked_ = false;
  Launch launch_;
};

}  // namespace

void bind_tables(py::module_& m) {
  py::class_<StateSnapshot>(m, "StateSnapshot")
      .def(py::init<const py::dict&>(), py::arg("state"))
      .def("matches", &StateSnapshot::matches, py::arg("state"));
  const auto scalars = [](auto&& cls, const char* name, auto fn, auto... args) {
    cls.def(name, fn, py::kw_only(), args..., py::arg("lr_tensor") = py::none(), py::arg("grad_scale") = py::none(),
            py::arg("found_inf") = py::none());
  };
  py::class_<GroupTable> table(m, "GroupTable");
  table.def(py::init<const std::string&, const py::list&, const py::list&, const std::vector<std::optional<std::string>>&,
                     const std::optional<std::string>&, const py::object&, const std::optional<std::string>&>(),
            py::arg("family"), py::arg("params"), py::arg("states"), py::arg("keys"), py::arg("step_key"),
            py::arg("group_params"), py::arg("master_key") = py::none())
      .def("__len__", &GroupTable::size)
      .def("check", &GroupTable::check, py::arg("params"))
      .def("release", &GroupTable::release)
      .def("grad_pointers", &GroupTable::grad_pointers)
      .def("advance_host_steps", &GroupTable::advance_host_steps)
      .def("pointer_table", &GroupTable::pointer_table);
  scalars(table, "adam", &GroupTable::adam, py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("weight_decay"),
          py::arg("eps"), py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled_weight_decay"), py::arg("l1"),
          py::arg("l1_proximal"));
  scalars(table, "rmsprop", &GroupTable::rmsprop, py::arg("lr"), py::arg("alpha"), py::arg("eps"),
          py::arg("weight_decay"), py::arg("momentum"), py::arg("centered"), py::arg("maximize"), py::arg("l1"),
          py::arg("l1_proximal"));
  scalars(table, "sgd", &GroupTable::sgd, py::arg("lr"), py::arg("weight_decay"), py::arg("momentum"),
          py::arg("dampening"), py::arg("nesterov"), py::arg("maximize"), py::arg("first_step"), py::arg("l1"),
          py::arg("l1_proximal"));
}

}  // namespace fused_opt::cpu

namespace fused_opt::cpu {
void bind_pack(py::module_& m);  // pack.cpp
}

// The CPU extension module: loading it registers the CPU kernels of the ops (ops_cpu.cpp,
// cuda_sim.cpp) and provides the group tables and the Triton backend's packing (pack.cpp).
PYBIND11_MODULE(_C, m) {
  try {
    fused_opt::register_kernels(c10::DispatchKey::CPU, __FILE__, [](torch::Library& lib) {
      fused_opt::register_cpu_kernels(lib);
      fused_opt::register_cuda_sim_kernels(lib);
    });
  } catch (const std::runtime_error& e) {
    throw pybind11::import_error(e.what());
  }
  fused_opt::cpu::bind_tables(m);
  fused_opt::cpu::bind_pack(m);
  fused_opt::mta::bind_table_step(m, "sim_table_step", &fused_opt::mta::sim_table_step);
  m.def("set_failing_sim_launches", &fused_opt::mta::set_failing_sim_launches, py::arg("count"),
        py::arg("counters") = false, py::arg("after") = 0,
        "For tests: `count` launches of backend='cuda_sim' (updates, or step counters with counters=True) "
        "fail, as a GPU launch can, after `after` that do not.");
  fused_opt::mta::bind_launch_plan(m);
  using fused_opt::cpu::Kernels;
  m.def("cpu_kernels", [] { return std::string(fused_opt::cpu::kernels_name(fused_opt::cpu::cpu_kernels())); },
        "The CPU kernels the ops run: AVX512, AVX2 or DEFAULT (the widest this CPU and torch use).");
  m.def("cpu_kernels_available", [] {
        std::vector<std::string> names;
        for (int k = 0; k <= static_cast<int>(fused_opt::cpu::best_cpu_kernels()); ++k) {
          names.emplace_back(fused_opt::cpu::kernels_name(static_cast<Kernels>(k)));
        }
        return names;
      }, "The CPU kernel variants this CPU can run, narrowest first.");
  // at::parallel_for is a header template when torch runs on OpenMP: it runs serially in code
  // compiled without OpenMP (setup.py's openmp_flags found none that the compiler builds).
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
  m.attr("cpu_kernels_threaded") = false;
#else
  m.attr("cpu_kernels_threaded") = true;
#endif
  m.def("use_cpu_kernels", [](const std::string& name) {
        for (int k = 0; k <= static_cast<int>(Kernels::AVX512); ++k) {
          if (name == fused_opt::cpu::kernels_name(static_cast<Kernels>(k))) {
            return fused_opt::cpu::use_cpu_kernels(static_cast<Kernels>(k));
          }
        }
        throw py::value_error("fused_opt: no CPU kernels named '" + name + "' (AVX512, AVX2 or DEFAULT)");
      }, py::arg("name"), "For tests and benchmarks: run another compiled variant of the CPU kernels.");
}
