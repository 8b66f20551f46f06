// Minimal fork-join parallel loop for the portable core (no torch dependency).
// OpenMP when the compiler has it, serial otherwise. Callers pass the thread count
// (the torch binding passes at::get_num_threads()).
#pragma once
#include <cstdint>
#include <exception>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace lf {

// Calls fn(begin_i, end_i) over [begin, end) split into chunks of at least `grain` items. An exception
// thrown by fn in a worker (std::bad_alloc, say) is rethrown here after the region: escaping an OpenMP
// region would call std::terminate and kill the process.
template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, int num_threads, const F& fn) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  int64_t max_chunks = (n + grain - 1) / grain;
  int threads = num_threads < 1 ? 1 : num_threads;
  if (max_chunks < threads) threads = static_cast<int>(max_chunks);
#ifdef _OPENMP
  if (threads > 1 && !omp_in_parallel()) {
    std::exception_ptr error = nullptr;
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      const int nt = omp_get_num_threads();
      const int64_t chunk = (n + nt - 1) / nt;
      const int64_t b = begin + t * chunk;
      const int64_t e = b + chunk < end ? b + chunk : end;
      if (b < e) {
        try {
          fn(b, e);
        } catch (...) {
#pragma omp critical(lf_parallel_for_error)
          if (!error) error = std::current_exception();
        }
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  fn(begin, end);
}

inline int default_num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace lf
