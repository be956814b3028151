#include "server/wire.h"

#include <vector>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/unknown_field_set.h>
#include <grpcpp/support/proto_buffer_reader.h>

#include "absl/strings/str_cat.h"

namespace superpose::server {
namespace {

namespace pb = google::protobuf;

absl::Status UnknownField(const pb::Message& msg, const pb::UnknownField& u,
                          const std::string& path) {
  const pb::FieldDescriptor* f = msg.GetDescriptor()->FindFieldByNumber(u.number());
  if (f == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(msg.GetDescriptor()->name(), " has an unknown field (number ", u.number(),
                     path.empty() ? "" : absl::StrCat(", in ", path.substr(0, path.size() - 1)),
                     "): this server does not implement it"));
  }
  const std::string field = path + f->name();
  if (f->enum_type() != nullptr && u.type() == pb::UnknownField::TYPE_VARINT) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": unknown value ",
                                                   static_cast<int32_t>(u.varint()), " of ",
                                                   f->enum_type()->name()));
  }
  return absl::InvalidArgumentError(absl::StrCat(field, " has the wrong wire type"));
}

}  // namespace

absl::Status CheckKnownFields(const pb::Message& msg, const std::string& path) {
  const pb::Reflection* r = msg.GetReflection();
  const pb::UnknownFieldSet& unknown = r->GetUnknownFields(msg);
  if (!unknown.empty()) return UnknownField(msg, unknown.field(0), path);
  std::vector<const pb::FieldDescriptor*> fields;
  r->ListFields(msg, &fields);
  for (const pb::FieldDescriptor* f : fields) {
    if (f->cpp_type() != pb::FieldDescriptor::CPPTYPE_MESSAGE) continue;
    if (!f->is_repeated()) {
      absl::Status st = CheckKnownFields(r->GetMessage(msg, f), absl::StrCat(path, f->name(), "."));
      if (!st.ok()) return st;
      continue;
    }
    for (int i = 0; i < r->FieldSize(msg, f); ++i) {
      absl::Status st = CheckKnownFields(r->GetRepeatedMessage(msg, f, i),
                                         absl::StrCat(path, f->name(), "[", i, "]."));
      if (!st.ok()) return st;
    }
  }
  return absl::OkStatus();
}

absl::Status ParseRequest(const grpc::ByteBuffer& bytes, pb::Message* msg) {
  // gRPC's own zero-copy reader over the message's slices (what its typed handlers use).
  grpc::ByteBuffer copy(bytes);  // the reader takes a mutable buffer; this copies no bytes
  grpc::ProtoBufferReader reader(&copy);
  const bool ok = reader.status().ok() && msg->ParseFromZeroCopyStream(&reader);
  if (!ok) {
    return absl::InvalidArgumentError(absl::StrCat("the request is not a valid ",
                                                   msg->GetDescriptor()->full_name(),
                                                   " (malformed or truncated protobuf)"));
  }
  return CheckKnownFields(*msg);
}

grpc::ByteBuffer Serialize(const pb::Message& msg) {
  grpc::Slice slice(msg.SerializeAsString());
  return grpc::ByteBuffer(&slice, 1);
}

}  // namespace superpose::server
