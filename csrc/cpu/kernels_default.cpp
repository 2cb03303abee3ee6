// The CPU kernels for any x86-64 or Arm CPU (at::vec's generic vectors).
#define CPU_CAPABILITY DEFAULT
#include "kernels.h"
