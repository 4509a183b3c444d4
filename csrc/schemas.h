// The schema of every compiled torchfast op, in one place: registered for the `torchfast` library
// by csrc/ops.cpp, and for the `torchfast_emu` library by the CUDA emulator tests (csrc/cuda_emu).
#pragma once

#include <torch/library.h>

namespace torchfast {

inline void define_ops(torch::Library& m) {
  // Fused BatchNorm + ReLU, forward. Returns (out, mean, invstd, var): in training the batch mean,
  // 1/sqrt(var + eps) and the biased batch variance; in eval the running statistics they were
  // computed from. Statistics are float32 (float64 for float64 input). The running statistics are
  // not touched here: the functional form folds (mean, var) into them with bn_update_running_stats_.
  m.def(
      "bn_relu_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward of bn_relu_fwd, recomputing the ReLU mask from the saved input. Returns
  // (grad_input, grad_weight, grad_bias); the last two are per-channel, in the statistics dtype.
  m.def(
      "bn_relu_bwd(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd, bool training) -> (Tensor, Tensor, Tensor)");
  // Fused BatchNorm + residual add + ReLU, forward: out = relu(input * scale + shift + residual),
  // the sum formed in the statistics dtype and rounded once. residual has input's shape and dtype
  // (any strides; the fast paths want input's). Statistics and outputs as bn_relu_fwd.
  m.def(
      "bn_add_relu_fwd(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward of bn_add_relu_fwd. The ReLU mask is read from the saved output (out > 0), so it is the
  // forward's exactly. Returns (grad_input, grad_residual, grad_weight, grad_bias): grad_residual is
  // grad_out masked (written by the reduction pass and read back by the elementwise pass: 5 reads
  // and 2 writes of the activation size in training); weight and bias grads are per-channel in the
  // statistics dtype, zero for an empty batch.
  m.def(
      "bn_add_relu_bwd(Tensor grad_out, Tensor out, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
      "bool training) -> (Tensor, Tensor, Tensor, Tensor)");
  // The running-statistics update that follows a training forward of either op:
  // running = (1 - momentum) * running + momentum * batch, with the unbiased variance
  // var * count / (count - 1); nothing for count == 0. One call for both statistics (the functional
  // form's update was four tensor ops, more than the kernel on small layers).
  m.def(
      "bn_update_running_stats_(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor mean, Tensor var, "
      "float momentum, int count) -> ()");
  // The whole functional call in one op, for the eager calls of torchfast.nn.functional: the forward
  // (bn_relu_fwd / bn_add_relu_fwd, through their autograd) and, in training, the running-statistics
  // update (bn_update_running_stats_ with count = elements per channel); returns the output only. One
  // crossing of the Python/C++ boundary and one Python object per call, where the two ops made two
  // crossings and five objects (the update's Python wrapper alone took 8-14 us on 8x64x8x8). Composite
  // (implemented with the ops above), so every device whose forward is registered has it;
  // torch.compile traces the two ops instead. They refuse every argument F.batch_norm refuses (the
  // forward ops' checks and one of their own), which lets the Python side skip its checks until one fails.
  m.def(
      "bn_relu(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps) -> Tensor");
  m.def(
      "bn_add_relu(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps) -> Tensor");
  // The local pieces of the synchronised layers (torchfast.nn.SyncBatchNormReLU/AddReLU), which
  // communicate between them (CPU kernels; other devices compose stock ops in Python).
  // bn_stats: per-channel mean and biased variance of this process's batch (statistics dtype; NaN when
  // empty). bn_relu_bwd_reduce: the masked gradient's per-channel sum(gm) and sum(gm * (x - mean)) in
  // float64, the mask recomputed from the input (out None: bn_relu) or out > 0 (bn_add_relu, which
  // also returns gm, the residual's gradient; bn_relu returns an empty tensor there).
  // bn_relu_bwd_elemt: the input gradient from sums and a count that cover every process's batch;
  // `grad` is dy masked here from the input (mask_from_input) or gm already masked.
  m.def("bn_stats(Tensor input) -> (Tensor, Tensor)");
  m.def(
      "bn_relu_bwd_reduce(Tensor grad_out, Tensor? out, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_relu_bwd_elemt(Tensor grad, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "Tensor sum_dy, Tensor sum_dy_xmu, int count, bool mask_from_input) -> Tensor");
  // The p-norm of all tensors of the list taken together (one device, one dtype). A 0-dim tensor
  // in float32 (float64 for float64 tensors). norm_type is any p > 0 or inf.
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type) -> Tensor");
  // tensors *= min(max_norm / (total_norm + 1e-6), 1), the coefficient computed on the device.
  m.def("multi_tensor_clip_(Tensor(a!)[] tensors, Tensor total_norm, float max_norm) -> ()");
  // Both in one call (one crossing of the Python/C++ boundary for thousands of small gradients):
  // returns the total norm (as multi_tensor_norm) and scales the tensors by the clip coefficient.
  m.def("clip_grad_norm_fused_(Tensor(a!)[] tensors, float max_norm, float norm_type) -> Tensor");
  // Fills each tensor with torchfast's Philox stream (csrc/philox.h). Per tensor i: streams[i]
  // is its counter stream, kinds[i] its distribution, params[8*i : 8*i+8] its parameters (philox.h).
  m.def(
      "philox_fill_(Tensor(a!)[] tensors, int seed, int[] streams, int[] kinds, float[] params) -> ()");
  // Which tensors of a list share memory (csrc/disjoint.h): per tensor, the pass it must be written in
  // so that no pass holds two tensors that overlap (all 0 when none do). Any device; reads no data.
  m.def("overlap_levels(Tensor[] tensors) -> int[]");
}

}  // namespace torchfast
