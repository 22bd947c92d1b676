// Stand-in for the CUDA runtime header in the CPU emulation build (see ../cuda_emu.h).
#pragma once
#include "cuda_runtime_api.h"
#include "../cuda_emu.h"
