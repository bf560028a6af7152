// Scratch memory of the CPU kernels.
#pragma once

#include <cstdint>
#include <memory>

namespace sparks {
namespace cpu {

// A 64-byte aligned byte buffer that keeps its memory between calls (kernels hold one per thread,
// `static thread_local`), so that a call does not pay fresh pages for its scratch. trim() gives
// back a buffer over kKeptBytes (a very large input's) instead of keeping it.
class Workspace {
 public:
  static constexpr int64_t kKeptBytes = 16 << 20;

  // At least `bytes` bytes, 64-byte aligned; contents are whatever the last use left.
  uint8_t* get(int64_t bytes) {
    if (bytes + 64 > size_) {
      raw_.reset(new uint8_t[bytes + 64]);
      size_ = bytes + 64;
    }
    return raw_.get() + ((64 - reinterpret_cast<uintptr_t>(raw_.get()) % 64) % 64);
  }

  void trim() {
    if (size_ > kKeptBytes) raw_.reset(), size_ = 0;
  }

 private:
  std::unique_ptr<uint8_t[]> raw_;
  int64_t size_ = 0;
};

}  // namespace cpu
}  // namespace sparks
