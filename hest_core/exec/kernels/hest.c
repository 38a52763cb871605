/* The native library of hest_core/native.py, built as one translation unit (so the fused
 * decode layer inlines the product loops of every weight kind):
 *
 *   gemv.c       small-M products on bf16 and int8 weights (hest_gemv_bf16, hest_gemv_i8)
 *   q4.c         the same on Q4_1 weights (hest_gemv_q4; also built alone by hest_core/q4.py)
 *   amx.c        AMX tiles for the bf16 and int8 products at many rows (where the CPU has them)
 *   layer_ops.c  norms, rope, decode attention
 *   layer.c      one decoder layer of a decode step (hest_decode_layer), the controller's logits
 *   head.c       the lm_head at decode from the model's Q8_0 blocks (hest_head_q8)
 *
 * native.py keys its cached build on every file of this directory. */
#include <math.h>
#include <omp.h>

#include "gemv.c"
#include "q4.c"
#include "amx.c"
#include "layer_ops.c"
#include "layer.c"
#include "head.c"
