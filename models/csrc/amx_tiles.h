// What every AMX kernel needs before its first tile: the OS's permission for the tile state
// (Linux grants it per process, on request) and the tile configuration record LDTILECFG reads.
// Include it only where __AMX_TILE__ is defined.
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace nanoserve {

// Whether this process may use AMX tiles: asks once (arch_prctl ARCH_REQ_XCOMP_PERM).
inline bool amx_permitted() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool ok = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

// LDTILECFG's 64-byte record, palette 1: tile t has rows[t] rows of colsb[t] bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace nanoserve
