// Bounded selection of the k best (key, id) pairs: smaller key is better, ties go to the smaller id.
// A max-heap whose root is the worst kept pair; `threshold()` lets a scan reject most candidates with
// one comparison before any heap work.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace lf {

template <class K>
class TopK {
 public:
  using Item = std::pair<K, int64_t>;  // (key, id); lexicographic order = rank order

  explicit TopK(int64_t k = 0) { reset(k); }

  void reset(int64_t k) {
    k_ = k;
    heap_.clear();
    // a bounded reservation: int8 search keeps three selections per (query, part), and with k near N
    // (k = 10^6, 256 queries) reserving k each took gigabytes up front; the heap grows as it fills
    heap_.reserve(static_cast<size_t>(std::min<int64_t>(k, 1024)));
  }

  int64_t k() const { return k_; }
  int64_t size() const { return static_cast<int64_t>(heap_.size()); }
  bool full() const { return size() >= k_; }

  // Largest key that can still enter (candidates with key > threshold are rejected, and with
  // key == threshold only when their id is smaller than the worst kept id).
  K threshold() const { return full() && k_ > 0 ? heap_.front().first : std::numeric_limits<K>::max(); }

  // Offer a pair; returns whether it was kept.
  bool push(K key, int64_t id) {
    if (k_ <= 0) return false;
    const Item it(key, id);
    if (!full()) {
      heap_.push_back(it);
      sift_up(heap_.size() - 1);
      return true;
    }
    if (!(it < heap_.front())) return false;
    heap_.front() = it;
    sift_down(0);
    return true;
  }

  // Offer a pair known to come after every kept id (a forward scan): key must be strictly better.
  inline bool push_scan(K key, int64_t id) {
    if (full() && !(key < heap_.front().first)) return false;
    return push(key, id);
  }

  const std::vector<Item>& items() const { return heap_; }

  // The kept pairs, best first.
  std::vector<Item> sorted() const {
    std::vector<Item> v = heap_;
    std::sort(v.begin(), v.end());
    return v;
  }

 private:
  void sift_up(size_t i) {
    while (i > 0) {
      size_t p = (i - 1) / 2;
      if (!(heap_[p] < heap_[i])) break;
      std::swap(heap_[p], heap_[i]);
      i = p;
    }
  }
  void sift_down(size_t i) {
    const size_t n = heap_.size();
    for (;;) {
      size_t l = 2 * i + 1, r = l + 1, m = i;
      if (l < n && heap_[m] < heap_[l]) m = l;
      if (r < n && heap_[m] < heap_[r]) m = r;
      if (m == i) break;
      std::swap(heap_[m], heap_[i]);
      i = m;
    }
  }

  int64_t k_ = 0;
  std::vector<Item> heap_;
};

// Merge several selections into the k best, written best first to keys/ids.
template <class K, class OutK>
void merge_topk(const std::vector<const TopK<K>*>& parts, int64_t k, OutK* keys, int64_t* ids) {
  std::vector<typename TopK<K>::Item> all;
  for (const auto* p : parts) all.insert(all.end(), p->items().begin(), p->items().end());
  const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(all.size()));
  std::partial_sort(all.begin(), all.begin() + m, all.end());
  for (int64_t i = 0; i < m; ++i) {
    keys[i] = static_cast<OutK>(all[i].first);
    ids[i] = all[i].second;
  }
}

}  // namespace lf
