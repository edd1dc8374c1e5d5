// Validate a tensor's contents once, not on every call: a process-wide cache of tensors whose data
// a kernel has checked (e.g. 2:4 metadata nibbles), keyed on the tensor's identity and content
// version. Host-only (no CUDA), so any family's CPU or CUDA code can use it and the CPU tests
// exercise exactly the code the CUDA path runs.
//
// Why: a data check on a CUDA tensor needs a device -> host read (a sync per call, and an error
// under CUDA-graph capture). Weights do not change between calls, so after one successful check a
// call only has to prove "same tensor, same contents" on the host, which costs a hash lookup.
//
// What a hit proves (the guarantee, also in docs/ops.md, SPARSE24):
//   * Same tensor object: the entry holds a weak reference to the TensorImpl, which keeps the
//     TensorImpl's memory allocated (not its storage), so no other tensor can be created at that
//     address while the entry exists. A freed tensor and a new one at the same address, or at the
//     same data_ptr, are different keys.
//   * Same contents as when checked: the tensor's version counter (`tensor._version`) is part of
//     the key. Every in-place write made through torch ops bumps it: `t.copy_()`, `t[i] = v`,
//     writes through any view or `.detach()` of t (they share the counter), under no_grad and in
//     inference mode alike.
//   * Same view: data_ptr, storage offset, sizes, strides and dtype are part of the key
//     (`t.data = other`, `set_`, `resize_` change them).
// What it cannot see: writes that do not go through the version counter: through `t.data`
// (a new counter), `t.numpy()`, `t.untyped_storage()`, another tensor sharing the storage
// without being a view of t (`set_`, `frombuffer`), DLPack or a raw data_ptr (another library, a
// custom kernel). After such a write call lowbit.clear_validation_cache(), or run with
// LOWBIT_VALIDATION_CACHE=0 (check on every call). Inference tensors (created under
// torch.inference_mode) have no version counter: they are never cached, always checked.
// Why the key is not the data pointer alone: a freed weight's memory is reused by the next
// allocation of its size, often another weight's metadata.
//
// Bounded: at most kCapacity entries. When full, entries of dead tensors are dropped; if all are
// alive the cache is emptied (every later call re-validates once). Cap-and-clear rather than LRU:
// a model touches each weight once per forward, so an LRU smaller than the working set misses
// on every call just like a cleared cache, and the cap (4096) is above the weight count of the
// models these kernels serve (one entry per quantized layer per checked property).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

namespace lowbit {

class ValidationCache {
 public:
  static constexpr size_t kCapacity = 4096;

  // `what` names the property checked, compared by address (one tensor can be checked for
  // different properties by different ops): pass an `inline constexpr char[]` from a header, one
  // definition, hence one address, in every translation unit (a literal's address may differ).
  struct Key {
    const c10::TensorImpl* impl = nullptr;
    const char* what = nullptr;
    uint32_t version = 0;
    const void* data = nullptr;
    int64_t offset = 0;
    c10::ScalarType dtype = c10::ScalarType::Undefined;
    c10::SmallVector<int64_t, 8> geometry;  // sizes then strides

    bool same_contents(const Key& o) const {
      return version == o.version && data == o.data && offset == o.offset && dtype == o.dtype &&
             geometry == o.geometry;
    }
  };

  struct Stats {
    int64_t hits, misses, entries;
    bool enabled;
  };

  // The key of t's current state, or nullopt when t cannot be cached (then validate every call).
  std::optional<Key> key(const at::Tensor& t, const char* what) const {
    if (!enabled_.load(std::memory_order_relaxed) || !t.defined()) return std::nullopt;
    const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    // Inference tensors have no version counter: in-place writes to them are invisible.
    if (!impl->version_counter().enabled() || !t.has_storage()) return std::nullopt;
    Key k;
    k.impl = impl;
    k.what = what;
    k.version = impl->version_counter().current_version();
    k.data = t.const_data_ptr();
    k.offset = t.storage_offset();
    k.dtype = t.scalar_type();
    for (int64_t s : t.sizes()) k.geometry.push_back(s);
    for (int64_t s : t.strides()) k.geometry.push_back(s);
    return k;
  }

  // Whether a tensor in state k has been validated; counts a hit or a miss.
  bool contains(const Key& k) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(Slot{k.impl, k.what});
    const bool hit = it != entries_.end() && it->second.key.same_contents(k);
    ++(hit ? hits_ : misses_);
    return hit;
  }

  // Records that t, in state k, passed validation. Take k BEFORE validating: a write racing with
  // the check then bumps the version past k and the next call validates again.
  void record(const at::Tensor& t, const Key& k) {
    // Destroyed after unlocking: dropping the last weak reference frees a TensorImpl.
    std::vector<Entry> dropped;
    std::lock_guard<std::mutex> lock(mutex_);
    if (!enabled_.load(std::memory_order_relaxed)) return;
    const Slot slot{k.impl, k.what};
    auto it = entries_.find(slot);
    if (it != entries_.end()) {  // same address while our weak reference lives: same tensor
      it->second.key = k;
      return;
    }
    if (entries_.size() >= kCapacity) {
      for (auto e = entries_.begin(); e != entries_.end();) {
        if (e->second.impl.expired()) {
          dropped.push_back(std::move(e->second));
          e = entries_.erase(e);
        } else {
          ++e;
        }
      }
      if (entries_.size() >= kCapacity) {
        for (auto& e : entries_) dropped.push_back(std::move(e.second));
        entries_.clear();
      }
    }
    entries_.emplace(slot, Entry{WeakImpl(t.getIntrusivePtr()), k});
  }

  void clear() {
    std::unordered_map<Slot, Entry, SlotHash> dropped;  // destroyed after unlocking, as in record()
    std::lock_guard<std::mutex> lock(mutex_);
    dropped.swap(entries_);
  }

  void set_enabled(bool on) {
    enabled_.store(on, std::memory_order_relaxed);
    if (!on) clear();
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return Stats{hits_, misses_, int64_t(entries_.size()), enabled_.load(std::memory_order_relaxed)};
  }

  void reset_stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    hits_ = misses_ = 0;
  }

 private:
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Slot {
    const c10::TensorImpl* impl;
    const char* what;
    bool operator==(const Slot& o) const { return impl == o.impl && what == o.what; }
  };
  struct SlotHash {
    size_t operator()(const Slot& s) const {
      return std::hash<const void*>()(s.impl) * 31u + std::hash<const void*>()(s.what);
    }
  };
  struct Entry {
    WeakImpl impl;
    Key key;
  };

  static bool enabled_from_env() {
    const char* v = std::getenv("LOWBIT_VALIDATION_CACHE");
    return !(v && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0 || std::strcmp(v, "false") == 0));
  }

  std::mutex mutex_;
  std::unordered_map<Slot, Entry, SlotHash> entries_;
  int64_t hits_ = 0, misses_ = 0;
  std::atomic<bool> enabled_{enabled_from_env()};
};

// The process-wide cache (one per extension library: an inline function's static is shared by
// every translation unit). Never destroyed: at exit its weak references could free TensorImpls
// after torch's own teardown.
inline ValidationCache& validation_cache() {
  static ValidationCache* cache = new ValidationCache();
  return *cache;
}

}  // namespace lowbit
