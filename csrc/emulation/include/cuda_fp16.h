// Stand-in for cuda_fp16.h in the CPU emulation build (see ../cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
