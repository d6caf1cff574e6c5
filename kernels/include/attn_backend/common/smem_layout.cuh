// Shared-memory tile layouts in 16-byte chunks: where chunk `chunk` of row `row`
// of a tile is stored. Element types only decide how many chunks a row has
// (`chunks_per_row`), so nothing here assumes an element size.
#pragma once

namespace attn_backend {

// 16-byte chunks in a row of `kHeadDim` elements of type T.
template <typename T, int kHeadDim>
constexpr int chunks_per_row() {
  static_assert((kHeadDim * sizeof(T)) % 16 == 0, "rows must be whole 16-byte chunks");
  return static_cast<int>(kHeadDim * sizeof(T) / 16);
}

// Rows of kChunks chunks back to back; chunk c of row r is stored at chunk c ^ (r % 8)
// of that row, which spreads the 8 rows one ldmatrix reads over all 32 banks. Rows of 8 k + 4
// chunks (64 bytes: FP8 rows of 64 dims; 576 bytes: FP8 MLA rows) start alternately at the
// start and the middle of a 128-byte line, so chunk c of row r sits at c ^ ((r / 2) % 4):
// with the alternation the 8 rows again cover the line's 8 chunk positions, and the XOR
// keeps each chunk inside its aligned group of 4 (the last group of a row is such a group).
template <int kChunks_>
struct XorSwizzledRows {
  static constexpr int kChunks = kChunks_;
  static_assert(kChunks % 4 == 0, "rows of whole 64-byte halves of 128-byte lines");
  __host__ __device__ __forceinline__ static constexpr int chunk_index(int row, int chunk) {
    if constexpr (kChunks % 8 == 4) {
      return row * kChunks + (chunk ^ ((row >> 1) & 3));
    } else {
      return row * kChunks + (chunk ^ (row & 7));
    }
  }
};

// Hopper's 128-byte swizzle (wgmma operands): a tile of kRows rows is stored as
// column blocks of kRows rows x 128 bytes (8 chunks); chunk c of row r of a block
// sits at chunk c ^ (r % 8) of that row. Blocks start 1024-byte aligned.
template <int kChunks_, int kRows>
struct Swizzled128BBlocks {
  static constexpr int kChunks = kChunks_;
  static_assert(kChunks % 8 == 0 && kRows % 8 == 0, "whole 128-byte lines and 8-row groups");
  // Column block b's chunks are block 0's moved by b * kBlockBytes.
  static constexpr int kBlockBytes = kRows * 8 * 16;
  __host__ __device__ __forceinline__ static constexpr int chunk_index(int row, int chunk) {
    return (chunk / 8) * (kRows * 8) + row * 8 + ((chunk % 8) ^ (row & 7));
  }
};

// Whether chunk 8 b + c of every row sits at chunk c's place moved by block b's offset (the
// swizzle permutes chunks only inside 128-byte blocks), so that a copier can work out a row's
// place once and step through its blocks by a constant.
template <typename Layout>
constexpr bool blocks_move_by_constant_offset() {
  if constexpr (Layout::kChunks % 8 != 0) {
    return false;
  } else {
    for (int row = 0; row < 16; ++row) {
      for (int block = 0; block < Layout::kChunks / 8; ++block) {
        for (int chunk = 0; chunk < 8; ++chunk) {
          if (Layout::chunk_index(row, 8 * block + chunk) !=
              Layout::chunk_index(row, chunk) + Layout::chunk_index(0, 8 * block)) {
            return false;
          }
        }
      }
    }
    return true;
  }
}

}  // namespace attn_backend
