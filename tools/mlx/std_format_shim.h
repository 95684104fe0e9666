// GCC 12's libstdc++ has no <format>. mlx-c only calls std::format with plain "{}" placeholders to build
// error messages, so a tiny substitute is enough. Force-included by linux-cpu.cmake; C++ only.
#pragma once
#ifdef __cplusplus
#if __has_include(<format>) && defined(__cpp_lib_format)
#include <format>
#else
#include <sstream>
#include <string>
#include <string_view>
namespace std {
namespace edgechat_format_detail {
inline void put(std::ostringstream& out, std::string_view& fmt) { out << fmt; fmt = {}; }
template <typename T, typename... Rest>
void put(std::ostringstream& out, std::string_view& fmt, const T& value, const Rest&... rest) {
  auto at = fmt.find("{}");
  if (at == std::string_view::npos) { out << fmt; fmt = {}; return; }
  out << fmt.substr(0, at) << value;
  fmt.remove_prefix(at + 2);
  put(out, fmt, rest...);
}
}  // namespace edgechat_format_detail
template <typename... Args>
std::string format(std::string_view fmt, const Args&... args) {
  std::ostringstream out;
  edgechat_format_detail::put(out, fmt, args...);
  return out.str();
}
}  // namespace std
#endif
#endif
