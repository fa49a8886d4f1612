// An Oclgrind plugin that counts the global-memory bytes each kernel launch loads and
// stores, per kernel argument: every access (scalar, vector, memcpy), and the distinct
// bytes touched (the least a kernel that reads each byte once would load).
//
// Oclgrind's own instruction counter (OCLGRIND_INST_COUNTS) counts instructions, not the
// bytes of vector loads; this one sees every access through memoryLoad/memoryStore.
// Loaded with OCLGRIND_PLUGINS=<this .so>; writes to the file MLC_EDGE_TRAFFIC_LOG one
// block per launch (the format mlc_edge/verify/traffic.py parses):
//   kernel <name>
//   arg <index> <name> <bytes loaded> <bytes stored> <distinct loaded> <distinct stored>
//   other <bytes loaded> <bytes stored>     (global buffers that are no argument)
//   end
// Built by mlc_edge/verify/oclgrind.py (g++, the wheel's headers, LLVM's headers).

#include "Context.h"
#include "Kernel.h"
#include "KernelInvocation.h"
#include "Memory.h"
#include "Plugin.h"

#include "llvm/IR/Argument.h"
#include "llvm/IR/DerivedTypes.h"
#include "llvm/IR/Function.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

namespace
{

struct Counts
{
  size_t loaded = 0, stored = 0;
  std::vector<bool> loadedBytes, storedBytes; // by offset: touched at least once
};

size_t countTrue(const std::vector<bool>& bits)
{
  size_t n = 0;
  for (bool b : bits)
    n += b;
  return n;
}

void mark(std::vector<bool>& bits, size_t offset, size_t size)
{
  if (bits.size() < offset + size)
    bits.resize(offset + size, false);
  for (size_t i = 0; i < size; i++)
    bits[offset + i] = true;
}

class TrafficCounter : public oclgrind::Plugin
{
public:
  explicit TrafficCounter(const oclgrind::Context* context)
    : oclgrind::Plugin(context)
  {
    const char* path = getenv("MLC_EDGE_TRAFFIC_LOG");
    m_out = path ? fopen(path, "a") : nullptr;
  }

  // One work-item at a time: the counts need no locking, and kernelEnd sees them all.
  bool isThreadSafe() const override { return false; }

  ~TrafficCounter() override
  {
    if (m_out)
      fclose(m_out);
  }

  void kernelBegin(const oclgrind::KernelInvocation* invocation) override
  {
    m_counts.clear();
    m_args.clear();
    const oclgrind::Kernel* kernel = invocation->getKernel();
    const oclgrind::Memory* global = m_context->getGlobalMemory();
    m_kernel = kernel->getName();
    // The buffer each global pointer argument points into.
    for (auto it = kernel->values_begin(); it != kernel->values_end(); ++it)
    {
      auto* arg = llvm::dyn_cast<llvm::Argument>(it->first);
      if (!arg || !arg->getType()->isPointerTy() ||
          arg->getType()->getPointerAddressSpace() != 1)
        continue;
      size_t buffer = global->extractBuffer(it->second.getPointer());
      m_args[arg->getArgNo()] = buffer;
    }
    m_names.clear();
    for (unsigned i = 0; i < kernel->getNumArguments(); i++)
      m_names.push_back(kernel->getArgumentName(i).str());
  }

  void kernelEnd(const oclgrind::KernelInvocation* invocation) override
  {
    if (!m_out)
      return;
    fprintf(m_out, "kernel %s\n", m_kernel.c_str());
    std::map<size_t, bool> reported;
    for (const auto& [index, buffer] : m_args)
    {
      Counts& c = m_counts[buffer];
      // Two arguments on one buffer: the bytes are counted under the first.
      bool first = !reported[buffer];
      reported[buffer] = true;
      fprintf(m_out, "arg %u %s %zu %zu %zu %zu\n", index,
              index < m_names.size() ? m_names[index].c_str() : "?",
              first ? c.loaded : 0, first ? c.stored : 0,
              first ? countTrue(c.loadedBytes) : 0,
              first ? countTrue(c.storedBytes) : 0);
    }
    size_t otherLoaded = 0, otherStored = 0;
    for (const auto& [buffer, c] : m_counts)
    {
      if (!reported.count(buffer))
      {
        otherLoaded += c.loaded;
        otherStored += c.stored;
      }
    }
    fprintf(m_out, "other %zu %zu\nend\n", otherLoaded, otherStored);
    fflush(m_out);
    m_counts.clear();
  }

  void memoryLoad(const oclgrind::Memory* memory,
                  const oclgrind::WorkItem* workItem, size_t address,
                  size_t size) override
  {
    load(memory, address, size);
  }

  void memoryLoad(const oclgrind::Memory* memory,
                  const oclgrind::WorkGroup* workGroup, size_t address,
                  size_t size) override
  {
    load(memory, address, size);
  }

  void memoryStore(const oclgrind::Memory* memory,
                   const oclgrind::WorkItem* workItem, size_t address,
                   size_t size, const uint8_t* storeData) override
  {
    store(memory, address, size);
  }

  void memoryStore(const oclgrind::Memory* memory,
                   const oclgrind::WorkGroup* workGroup, size_t address,
                   size_t size, const uint8_t* storeData) override
  {
    store(memory, address, size);
  }

  void memoryAtomicLoad(const oclgrind::Memory* memory,
                        const oclgrind::WorkItem* workItem, oclgrind::AtomicOp op,
                        size_t address, size_t size) override
  {
    load(memory, address, size);
  }

  void memoryAtomicStore(const oclgrind::Memory* memory,
                         const oclgrind::WorkItem* workItem,
                         oclgrind::AtomicOp op, size_t address,
                         size_t size) override
  {
    store(memory, address, size);
  }

private:
  void load(const oclgrind::Memory* memory, size_t address, size_t size)
  {
    if (memory->getAddressSpace() != 1)
      return;
    Counts& c = m_counts[memory->extractBuffer(address)];
    c.loaded += size;
    mark(c.loadedBytes, memory->extractOffset(address), size);
  }

  void store(const oclgrind::Memory* memory, size_t address, size_t size)
  {
    if (memory->getAddressSpace() != 1)
      return;
    Counts& c = m_counts[memory->extractBuffer(address)];
    c.stored += size;
    mark(c.storedBytes, memory->extractOffset(address), size);
  }

  FILE* m_out;
  std::string m_kernel;
  std::vector<std::string> m_names;
  std::map<unsigned, size_t> m_args; // argument index -> buffer
  std::map<size_t, Counts> m_counts;  // buffer -> counts
};

TrafficCounter* instance = nullptr;

} // namespace

extern "C" void initializePlugins(oclgrind::Context* context)
{
  instance = new TrafficCounter(context);
  context->registerPlugin(instance);
}

extern "C" void releasePlugins(oclgrind::Context* context)
{
  context->unregisterPlugin(instance);
  delete instance;
  instance = nullptr;
}
