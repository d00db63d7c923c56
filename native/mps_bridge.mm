// Optional macOS bridge: compiles the quantattn-hf Metal library and encodes its kernels on PyTorch's
// MPS stream, for PyTorch builds without torch.mps.compile_shader.
//
// NEVER COMPILED: no Mac and no macOS SDK exist where this was written. It follows Apple's published
// pattern for custom PyTorch MPS kernels (torch/mps.h: get_command_buffer, get_dispatch_queue, commit)
// and PyTorch's own getMTLBufferStorage. Built by `python native/build_mps_bridge.py` on macOS through
// torch.utils.cpp_extension; used by quantattn_hf.backends.metal.MetalBackend when
// QUANTATTN_MPS_BRIDGE=1 and torch.mps.compile_shader is missing.
#include <torch/extension.h>
#include <torch/mps.h>

#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <string>
#include <unordered_map>
#include <vector>

namespace {

// The MTLBuffer behind an MPS tensor's storage (as in PyTorch's ATen/native/mps/OperationUtils.h).
id<MTLBuffer> buffer_of(const torch::Tensor& t) { return __builtin_bit_cast(id<MTLBuffer>, t.storage().data()); }

class Library {
 public:
  explicit Library(const std::string& source) {
    device_ = MTLCreateSystemDefaultDevice();
    TORCH_CHECK(device_ != nil, "quantattn-hf mps bridge: no Metal device");
    NSError* error = nil;
    MTLCompileOptions* options = [MTLCompileOptions new];
    NSString* text = [NSString stringWithUTF8String:source.c_str()];
    library_ = [device_ newLibraryWithSource:text options:options error:&error];
    TORCH_CHECK(library_ != nil, "quantattn-hf mps bridge: Metal compile failed: ",
                error ? error.localizedDescription.UTF8String : "unknown error");
  }

  // Dispatch `name` over n_groups threadgroups of group_size threads; buffers bound in argument order.
  void launch(const std::string& name, const std::vector<torch::Tensor>& buffers, int64_t n_groups,
              int64_t group_size) {
    for (const auto& t : buffers) TORCH_CHECK(t.device().is_mps(), "quantattn-hf mps bridge: ", name, ": non-MPS buffer");
    id<MTLComputePipelineState> pso = pipeline(name);
    TORCH_CHECK(group_size <= static_cast<int64_t>(pso.maxTotalThreadsPerThreadgroup), "quantattn-hf mps bridge: ",
                name, ": threadgroup of ", group_size, " threads over the device limit ",
                static_cast<int64_t>(pso.maxTotalThreadsPerThreadgroup));
    id<MTLCommandBuffer> command_buffer = torch::mps::get_command_buffer();
    TORCH_CHECK(command_buffer != nil, "quantattn-hf mps bridge: no MPS command buffer");
    dispatch_queue_t queue = torch::mps::get_dispatch_queue();
    dispatch_sync(queue, ^() {
      id<MTLComputeCommandEncoder> encoder = [command_buffer computeCommandEncoder];
      [encoder setComputePipelineState:pso];
      for (size_t i = 0; i < buffers.size(); ++i) {
        const torch::Tensor& t = buffers[i];
        [encoder setBuffer:buffer_of(t) offset:t.storage_offset() * t.element_size() atIndex:i];
      }
      [encoder dispatchThreadgroups:MTLSizeMake(n_groups, 1, 1) threadsPerThreadgroup:MTLSizeMake(group_size, 1, 1)];
      [encoder endEncoding];
      torch::mps::commit();
    });
  }

 private:
  id<MTLComputePipelineState> pipeline(const std::string& name) {
    auto it = pipelines_.find(name);
    if (it != pipelines_.end()) return it->second;
    id<MTLFunction> fn = [library_ newFunctionWithName:[NSString stringWithUTF8String:name.c_str()]];
    TORCH_CHECK(fn != nil, "quantattn-hf mps bridge: no kernel named ", name);
    NSError* error = nil;
    id<MTLComputePipelineState> pso = [device_ newComputePipelineStateWithFunction:fn error:&error];
    TORCH_CHECK(pso != nil, "quantattn-hf mps bridge: pipeline for ", name, " failed: ",
                error ? error.localizedDescription.UTF8String : "unknown error");
    pipelines_[name] = pso;
    return pso;
  }

  id<MTLDevice> device_ = nil;
  id<MTLLibrary> library_ = nil;
  std::unordered_map<std::string, id<MTLComputePipelineState>> pipelines_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Library>(m, "Library")
      .def(pybind11::init<const std::string&>())
      .def("launch", &Library::launch, pybind11::arg("name"), pybind11::arg("buffers"), pybind11::arg("n_groups"),
           pybind11::arg("group_size"));
}
